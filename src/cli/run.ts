import { isCairnError, loadGraph, run } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse, readInput } from "./args.ts";
import { formatDuration, plural, renderFinalState, stepReporter, type Io } from "./render.ts";
import { explainStepFailure } from "./failure.ts";

export const usage = `cairn run <graph.ts> [--input '<json>' | --input @file.json] [--thread <id>] [--store <uri>] [--json] [--verbose]

Start a new thread of a graph and run it, checkpointing after every step.
  --input     the input as JSON, or @path to a JSON file (default: the workflow's built-in input)
  --thread    the thread id (default: a new random id, printed)
  --store     file:<dir> | sqlite:<path> | postgres://user@host:port/db (default: $CAIRN_STORE or file:.cairn)
  --json      print the final state as JSON on stdout (step lines go to stderr)`;

export async function runCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("run", argv, { ...COMMON_OPTIONS, input: { type: "string" }, thread: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const file = onePositional("run", positionals, "a graph file (e.g. graphs/moral-video.ts)");
  const input = await readInput(values.input, process.cwd());
  const target = await loadGraph(file);
  const reporter = stepReporter(io, values.verbose);
  const started = Date.now();
  const thread = values.thread;
  try {
    const result = await run(target, { input, thread, store: values.store, onEvent: reporter.onEvent, onStart: (t) => io.err(`thread ${t.thread} · store ${t.store}`) });
    io.err(`completed thread ${result.thread}: ${plural(reporter.stepsDone(), "step")} in ${formatDuration(Date.now() - started)}`);
    renderFinalState(io, result.state as Record<string, unknown>, values.json);
    return 0;
  } catch (error) {
    if (isCairnError(error, "STEP_FAILED")) return explainStepFailure(io, error, file, values.store, values.verbose);
    throw error;
  }
}
