import type { RunResult } from "../index.ts";
import { formatUsd, isCairnError, isEmptyUsage } from "../index.ts";
import { explainStepFailure, explainStorageFailure } from "./failure.ts";
import { describeUsage, ProgressReporter } from "./progress.ts";
import { flag, formatBytes, formatDuration, plural, renderFinalState, shellArg, type Io } from "./render.ts";

/** Exit code of a run that stopped on Ctrl+C or SIGTERM (128 + SIGINT), as shells report it. */
export const EXIT_INTERRUPTED = 130;
/** Exit code of a run that stopped because its budget was reached. */
export const EXIT_BUDGET = 3;

export interface SessionOptions {
  file: string;
  store: string | undefined;
  verbose: boolean;
  json: boolean;
  budgetUsd: number | undefined;
  /** "run" or "resume": how the closing line reads. */
  verb: "run" | "resume";
}

/** What `run` and `resume` hand to cairn's API: progress, and the switch Ctrl+C pulls. */
export interface SessionHooks {
  onEvent: ProgressReporter["onEvent"];
  drain: AbortSignal;
}

/**
 * Run or resume with what a person at a terminal needs: live progress, and signals handled so nothing
 * finished is lost. The first Ctrl+C (or SIGTERM) drains: running steps and items finish and are saved,
 * nothing new starts, and the command says where it stopped and how to continue (exit 130). A second one
 * exits at once; the store is still consistent (every write is atomic or checksummed), only the work in
 * flight is lost.
 */
export async function session(io: Io, options: SessionOptions, start: (hooks: SessionHooks) => Promise<RunResult>): Promise<number> {
  const reporter = new ProgressReporter(io, options.verbose);
  const drain = new AbortController();
  // A second signal ends the command at once: main() returns its code and the process exits, with the
  // run's work in flight abandoned (the store is consistent: every write is checksummed or atomic).
  let abandon!: (code: number) => void;
  const abandoned = new Promise<number>((resolve) => (abandon = resolve));
  let signals = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    signals += 1;
    if (signals === 1) {
      io.live?.clear();
      io.err(`■ ${signal}: finishing the work in flight and saving it; nothing new starts. Press Ctrl+C again to exit at once.`);
      drain.abort(signal);
      return;
    }
    io.live?.clear();
    io.err(`■ ${signal} again: exiting now. Work saved so far is kept; work in flight (and finished items held for a batch) will rerun on resume.`);
    abandon(EXIT_INTERRUPTED);
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  const started = Date.now();
  try {
    const running = start({ onEvent: reporter.onEvent, drain: drain.signal });
    const outcome = await Promise.race([running.then((result) => ({ result })), abandoned.then((code) => ({ code }))]);
    reporter.finish();
    if ("code" in outcome) {
      running.catch(() => {});
      return outcome.code;
    }
    return report(io, options, outcome.result, reporter.stepsDone(), Date.now() - started);
  } catch (error) {
    reporter.finish();
    if (isCairnError(error, "STEP_FAILED")) return explainStepFailure(io, error, options.file, options.store, options.verbose);
    if (isCairnError(error, "DISK_FULL") || isCairnError(error, "STORE_IO_FAILED")) return explainStorageFailure(io, error, options.file, options.store, options.verbose);
    throw error;
  } finally {
    process.off("SIGINT", onSignal);
    process.off("SIGTERM", onSignal);
  }
}

function report(io: Io, options: SessionOptions, result: RunResult, stepsRun: number, elapsedMs: number): number {
  const resumeCommand = `cairn resume ${shellArg(options.file)} ${flag("thread", result.thread)}${options.store ? ` ${flag("store", options.store)}` : ""}`;
  const { usage } = result;
  if (result.status === "already-completed") {
    io.err(`Thread ${result.thread} already completed; nothing to do. To rerun part of it: ${resumeCommand} --from-step <step>`);
  } else if (result.status === "stopped") {
    const stop = result.stopped!;
    const where = stop.next.length ? ` before ${stop.next.join(", ")}` : "";
    const items = stop.itemsNotStarted ? ` (${plural(stop.itemsNotStarted, "item")} not started)` : "";
    io.err(`■ stopped${where}${items} after ${plural(stepsRun, "step")} in ${formatDuration(elapsedMs)}. Everything finished is saved in thread ${result.thread} (store ${result.store}).`);
    io.err(`  spent: ${describeUsage(usage.thread)} in all; ${formatUsd(usage.run.usd)} by this run.`);
    if (stop.reason === "budget") {
      const higher = suggestBudget(usage.thread.usd, options.budgetUsd);
      io.err(`  The budget of ${formatUsd(options.budgetUsd ?? 0)} is reached. Continue with a higher one: ${resumeCommand} --budget-usd ${higher}`);
    } else io.err(`  Continue with: ${resumeCommand}`);
  } else {
    io.err(`completed thread ${result.thread}: ${plural(stepsRun, "step")} ${options.verb === "resume" ? "run " : ""}in ${formatDuration(elapsedMs)}`);
    if (!isEmptyUsage(usage.thread)) {
      const thisRun = isEmptyUsage(usage.run) ? "nothing by this run" : `${describeUsage(usage.run)} by this run`;
      io.err(`  spent: ${thisRun}; ${formatUsd(usage.thread.usd)} by the thread in all.`);
    }
    if (result.cleanedUp) {
      const c = result.cleanedUp;
      io.err(
        `  the workflow cleans up on success: thread ${result.thread} keeps only its final checkpoint; removed ${plural(c.checkpoints, "older checkpoint")}` +
          ` and ${plural(c.artifacts, "artifact")} only they referred to (${formatBytes(c.bytesFreed)}).`,
      );
    }
  }
  if (options.verb === "resume" && !isEmptyUsage(usage.reused) && result.status !== "already-completed") {
    io.err(`  resuming reused ${describeUsage(usage.reused)} of earlier work instead of paying for it again.`);
  }
  if (!isEmptyUsage(usage.failed)) io.err(`  ${formatUsd(usage.failed.usd)} went to attempts that failed.`);
  renderFinalState(io, result.state as Record<string, unknown>, options.json);
  if (result.status === "stopped") return result.stopped!.reason === "budget" ? EXIT_BUDGET : EXIT_INTERRUPTED;
  return 0;
}

/** A round budget comfortably above what was spent: what the printed resume command proposes. */
function suggestBudget(spent: number, budget: number | undefined): string {
  const base = Math.max(spent, budget ?? 0);
  const next = base * 2 || 1;
  return next >= 1 ? next.toFixed(2) : next.toPrecision(2);
}
