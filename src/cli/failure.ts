import type { CairnError } from "../index.ts";
import { flag, plural, shellArg, type Io } from "./render.ts";

/** Print what failed, what is saved, and the exact command that continues. Exit code 1. */
export function explainStepFailure(io: Io, error: CairnError, file: string, store: string | undefined, verbose: boolean): number {
  const d = error.details as { thread: string; step: string; stepsSaved: number; itemsSaved: number; itemsFailed: number; store: string };
  io.err(`✗ ${error.message}`);
  if (d.itemsSaved > 0) {
    io.err(`  ${plural(d.itemsSaved, "task")} of this step finished and ${d.itemsSaved === 1 ? "is" : "are"} saved; ${d.itemsFailed} failed. A resume reruns only the failed ones.`);
  }
  io.err(`  ${plural(d.stepsSaved, "finished step")} ${d.stepsSaved === 1 ? "is" : "are"} saved in thread ${d.thread} (store ${d.store}); they will not run again.`);
  io.err(`  Continue with: cairn resume ${shellArg(file)} ${flag("thread", d.thread)}${store ? ` ${flag("store", store)}` : ""}`);
  if (verbose && error.cause instanceof Error && error.cause.stack) io.err(error.cause.stack);
  return 1;
}
