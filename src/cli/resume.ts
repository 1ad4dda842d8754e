import { CairnError, loadGraph, resume } from "../index.ts";
import { budgetOption, COMMON_OPTIONS, onePositional, parse, RUN_OPTIONS } from "./args.ts";
import type { Io } from "./render.ts";
import { session } from "./session.ts";

export const usage = `cairn resume <graph.ts> --thread <id> [--from-step <name> | --checkpoint <id>] [--budget-usd <n>] [--store <uri>] [--json] [--verbose]

Continue a thread. Finished steps (and finished items of a fan-out) never run again.
  --from-step   rerun this step and every step after it, from the state before it (history keeps the old branch)
  --checkpoint  continue from this checkpoint of the thread's history (see: cairn history <thread>)
  --budget-usd  stop cleanly at a step boundary once the thread has spent this many dollars in all (exit 3)`;

export async function resumeCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("resume", argv, {
    ...COMMON_OPTIONS,
    ...RUN_OPTIONS,
    thread: { type: "string" },
    "from-step": { type: "string" },
    checkpoint: { type: "string" },
  });
  if (values.help) return io.out(usage), 0;
  const file = onePositional("resume", positionals, "a graph file (e.g. graphs/moral-video.ts)");
  if (!values.thread) throw new CairnError("INVALID_ARGUMENT", `cairn resume needs --thread <id>. List threads with: cairn threads`);
  const budgetUsd = budgetOption(values["budget-usd"]);
  const target = await loadGraph(file);
  return session(io, { file, store: values.store, verbose: values.verbose, json: values.json, budgetUsd, verb: "resume" }, (hooks) =>
    resume(target, {
      thread: values.thread!,
      fromStep: values["from-step"],
      checkpoint: values.checkpoint,
      store: values.store,
      budgetUsd,
      ...hooks,
      onStart: (t) => io.err(`resuming thread ${t.thread} · store ${t.store}${t.skipped.length ? ` · already done: ${t.skipped.join(", ")}` : ""}`),
    }),
  );
}
