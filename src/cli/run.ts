import { loadGraph, run } from "../index.ts";
import { budgetOption, COMMON_OPTIONS, onePositional, parse, readInput, RUN_OPTIONS } from "./args.ts";
import type { Io } from "./render.ts";
import { session } from "./session.ts";

export const usage = `cairn run <graph.ts> [--input '<json>' | --input @file.(json|yaml)] [--thread <id>] [--budget-usd <n>] [--store <uri>] [--json] [--verbose]

Start a new thread of a graph and run it, checkpointing after every step.
  --input       the input as JSON, or @path to a JSON or YAML file (default: the workflow's built-in input)
  --thread      the thread id (default: a new random id, printed)
  --budget-usd  stop cleanly at a step boundary once the thread has spent this many dollars (exit 3)
  --store       file:<dir> | sqlite:<path> | postgres://user@host:port/db (default: $CAIRN_STORE or file:.cairn)
  --json        print the final state as JSON on stdout (progress goes to stderr)
Ctrl+C stops at the next step boundary keeping finished work (exit 130); a second Ctrl+C exits at once.`;

export async function runCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("run", argv, { ...COMMON_OPTIONS, ...RUN_OPTIONS, input: { type: "string" }, thread: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const file = onePositional("run", positionals, "a graph file (e.g. graphs/moral-video.ts)");
  const input = await readInput(values.input, process.cwd());
  const budgetUsd = budgetOption(values["budget-usd"]);
  const target = await loadGraph(file);
  return session(io, { file, store: values.store, verbose: values.verbose, json: values.json, budgetUsd, verb: "run" }, (hooks) =>
    run(target, { input: input?.value, inputSource: input?.source, thread: values.thread, store: values.store, budgetUsd, ...hooks, onStart: (t) => io.err(`thread ${t.thread} · store ${t.store}`) }),
  );
}
