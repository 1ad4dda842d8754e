import { isCairnError, loadGraph, resume } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { explainStepFailure } from "./failure.ts";
import { flag, formatDuration, plural, renderFinalState, shellArg, stepReporter, type Io } from "./render.ts";
import { CairnError } from "../index.ts";

export const usage = `cairn resume <graph.ts> --thread <id> [--from-step <name> | --checkpoint <id>] [--store <uri>] [--json] [--verbose]

Continue a thread. Finished steps never run again.
  --from-step   rerun this step and every step after it, from the state before it (history keeps the old branch)
  --checkpoint  continue from this checkpoint of the thread's history (see: cairn history <thread>)`;

export async function resumeCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("resume", argv, {
    ...COMMON_OPTIONS,
    thread: { type: "string" },
    "from-step": { type: "string" },
    checkpoint: { type: "string" },
  });
  if (values.help) return io.out(usage), 0;
  const file = onePositional("resume", positionals, "a graph file (e.g. graphs/moral-video.ts)");
  if (!values.thread) throw new CairnError("INVALID_ARGUMENT", `cairn resume needs --thread <id>. List threads with: cairn threads`);
  const target = await loadGraph(file);
  const reporter = stepReporter(io, values.verbose);
  const started = Date.now();
  try {
    const result = await resume(target, {
      thread: values.thread,
      fromStep: values["from-step"],
      checkpoint: values.checkpoint,
      store: values.store,
      onEvent: reporter.onEvent,
      onStart: (t) => io.err(`resuming thread ${t.thread} · store ${t.store}${t.skipped.length ? ` · already done: ${t.skipped.join(", ")}` : ""}`),
    });
    if (result.status === "already-completed") {
      io.err(`Thread ${result.thread} already completed; nothing to do. To rerun part of it: cairn resume ${shellArg(file)} ${flag("thread", result.thread)} --from-step <step>`);
    } else {
      io.err(`completed thread ${result.thread}: ${plural(reporter.stepsDone(), "step")} run in ${formatDuration(Date.now() - started)}`);
    }
    renderFinalState(io, result.state as Record<string, unknown>, values.json);
    return 0;
  } catch (error) {
    if (isCairnError(error, "STEP_FAILED")) return explainStepFailure(io, error, file, values.store, values.verbose);
    throw error;
  }
}
