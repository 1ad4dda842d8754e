import { formatUsd, isEmptyUsage, type CairnError, type Usage } from "../index.ts";
import { flag, plural, shellArg, type Io } from "./render.ts";

/** Print what failed, what is saved, and the exact command that continues. Exit code 1. */
export function explainStepFailure(io: Io, error: CairnError, file: string, store: string | undefined, verbose: boolean): number {
  const d = error.details as {
    thread: string;
    step: string;
    stepsSaved: number;
    itemsSaved: number;
    itemsFailed: number;
    store: string;
    usage?: { run: Usage; failed: Usage; thread: Usage };
  };
  io.err(`✗ ${error.message}`);
  if (d.itemsSaved > 0) {
    io.err(`  ${plural(d.itemsSaved, "task")} of this step finished and ${d.itemsSaved === 1 ? "is" : "are"} saved; ${d.itemsFailed} failed. A resume reruns only the failed ones.`);
  }
  io.err(`  ${plural(d.stepsSaved, "finished step")} ${d.stepsSaved === 1 ? "is" : "are"} saved in thread ${d.thread} (store ${d.store}); they will not run again.`);
  if (d.usage && !isEmptyUsage(d.usage.run)) {
    const lost = isEmptyUsage(d.usage.failed) ? "" : `, ${formatUsd(d.usage.failed.usd)} of it on attempts that failed`;
    io.err(`  This run spent ${formatUsd(d.usage.run.usd)}${lost}; the thread has spent ${formatUsd(d.usage.thread.usd)} in all.`);
  }
  io.err(`  Continue with: cairn resume ${shellArg(file)} ${flag("thread", d.thread)}${store ? ` ${flag("store", store)}` : ""}`);
  if (verbose && error.cause instanceof Error && error.cause.stack) io.err(error.cause.stack);
  return 1;
}

/** The store's disk is full or failed: what was not saved, and the exact command that continues once it is fixed. Exit code 1. */
export function explainStorageFailure(io: Io, error: CairnError, file: string, store: string | undefined, verbose: boolean): number {
  const thread = error.details.thread;
  io.err(`✗ ${error.message}`);
  if (typeof thread === "string") {
    const fix = error.code === "DISK_FULL" ? "Once there is room" : "Once the disk is fixed";
    io.err(`  ${fix}, continue with: cairn resume ${shellArg(file)} ${flag("thread", thread)}${store ? ` ${flag("store", store)}` : ""}`);
  }
  if (verbose && error.cause instanceof Error && error.cause.stack) io.err(error.cause.stack);
  return 1;
}
