import { CairnError, isCairnError, loadGraph, previewResume, resume, type ResumeOptions } from "../index.ts";
import { budgetOption, COMMON_OPTIONS, onePositional, parse, readInput, RUN_OPTIONS } from "./args.ts";
import { renderPreview } from "./preview.ts";
import { flag, shellArg, type Io } from "./render.ts";
import { session } from "./session.ts";

export const usage = `cairn resume <graph.ts> --thread <id> [--from-step <name> | --checkpoint <id>] [--dry-run] [--force] [--fallback] [--input …] [--budget-usd <n>] [--store <uri>] [--json] [--verbose]

Continue a thread. Finished steps (and finished items of a fan-out) never run again.
  --from-step   rerun this step and every step after it, from the state before it (history keeps the old branch)
  --checkpoint  continue from this checkpoint of the thread's history (see: cairn history <thread>)
  --dry-run     run nothing: show which steps (and fan-out items) would be reused or run, why, and the money reused
  --force       resume although the workflow or its input changed since the thread's work was saved
  --input       the input as it is now ('<json>' or @file), checked against the one the thread started with
  --fallback    if the thread's journal is damaged, continue from its newest intact checkpoint (each skipped one is named)
  --budget-usd  stop cleanly at a step boundary once the thread has spent this many dollars in all (exit 3)
A resume refuses (exit 2, nothing written) when the workflow's steps, routes or declared fingerprints, or the
input file, changed in a way that touches finished work; the message lists what differs and the ways on.`;

export async function resumeCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("resume", argv, {
    ...COMMON_OPTIONS,
    ...RUN_OPTIONS,
    thread: { type: "string" },
    "from-step": { type: "string" },
    checkpoint: { type: "string" },
    "dry-run": { type: "boolean", default: false },
    force: { type: "boolean", default: false },
    input: { type: "string" },
    fallback: { type: "boolean", default: false },
  });
  if (values.help) return io.out(usage), 0;
  const file = onePositional("resume", positionals, "a graph file (e.g. graphs/moral-video.ts)");
  if (!values.thread) throw new CairnError("INVALID_ARGUMENT", `cairn resume needs --thread <id>. List threads with: cairn threads`);
  const budgetUsd = budgetOption(values["budget-usd"]);
  const input = await readInput(values.input, process.cwd());
  const target = await loadGraph(file);
  const common = { thread: values.thread, fromStep: values["from-step"], checkpoint: values.checkpoint, store: values.store, force: values.force, fallback: values.fallback, input: input?.value, inputSource: input?.source };
  try {
    if (values["dry-run"]) return renderPreview(io, await previewResume(target, common), { file, store: values.store, json: values.json });
    return await resumeSession(io, file, values, budgetUsd, target, common);
  } catch (error) {
    throw withGraphFile(error, file, values.store);
  }
}

async function resumeSession(
  io: Io,
  file: string,
  values: { thread?: string; store?: string; verbose: boolean; json: boolean },
  budgetUsd: number | undefined,
  target: Awaited<ReturnType<typeof loadGraph>>,
  common: Omit<ResumeOptions, "budgetUsd">,
): Promise<number> {
  return session(io, { file, store: values.store, verbose: values.verbose, json: values.json, budgetUsd, verb: "resume" }, (hooks) =>
    resume(target, {
      ...common,
      budgetUsd,
      ...hooks,
      onStart: (t) => {
        io.err(`resuming thread ${t.thread} · store ${t.store}${t.skipped.length ? ` · already done: ${t.skipped.join(", ")}` : ""}`);
        for (const notice of t.notices) io.err(`  note: ${notice}`);
      },
    }),
  );
}

/** The library's messages say `cairn resume …`; at the command line the graph file is known. */
function withGraphFile(error: unknown, file: string, store: string | undefined): unknown {
  if (isCairnError(error) && (error.code === "FINGERPRINT_MISMATCH" || error.code === "STATE_SCHEMA_MISMATCH")) {
    const where = `${shellArg(file)}${store ? ` ${flag("store", store)}` : ""}`;
    error.message = error.message.replaceAll("cairn resume …", `cairn resume ${where}`).replaceAll("cairn run …", `cairn run ${where}`);
  }
  if (isCairnError(error, "CHECKPOINT_CORRUPT")) {
    error.message = error.message.replaceAll("cairn resume <graph.ts>", `cairn resume ${shellArg(file)}${store ? ` ${flag("store", store)}` : ""}`);
  }
  return error;
}
