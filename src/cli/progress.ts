import { addUsage, formatUsd, NO_USAGE, type RunEvent, type Usage } from "../index.ts";
import { formatDuration, plural, type Io } from "./render.ts";

/**
 * Turns a run's events into what a person watches: one permanent line per finished step (with its cost),
 * and, on a terminal, a live block redrawn in place: the step running now, a bar for a fan-out's items
 * or a step's own progress, steps done of total, elapsed time, ETA and the money spent so far. Without a
 * terminal (CI, a pipe) the live block becomes a plain line every 10 % of a fan-out of 20 or more items (or
 * when an item finishes 15 seconds after the last line), and a step's own progress every 15 seconds.
 */
export class ProgressReporter {
  private steps: string[] = [];
  private readonly done = new Set<string>();
  private readonly fanouts = new Map<string, { total: number; done: number; failed: number; startedAt: number; doneAtStart: number; usage: Usage }>();
  private readonly running = new Map<string, { startedAt: number; done?: number; total?: number; message?: string }>();
  private spent: Usage = NO_USAGE;
  private spentBefore: Usage = NO_USAGE;
  private readonly startedAt = Date.now();
  private stepsRun = 0;
  private timer: NodeJS.Timeout | undefined;
  private lastPlain = 0;
  private lastPlainFraction = new Map<string, number>();

  constructor(
    private readonly io: Io,
    private readonly verbose: boolean,
    private readonly now: () => number = Date.now,
  ) {}

  readonly onEvent = (e: RunEvent): void => {
    switch (e.type) {
      case "run:start":
        this.steps = e.steps;
        for (const s of e.skipped) this.done.add(s);
        this.spentBefore = e.spentBefore;
        this.lastPlain = this.now();
        if (this.io.live) this.timer = setInterval(() => this.draw(), 200).unref();
        break;
      case "fanout":
        this.lastPlainFraction.delete(e.step);
        this.fanouts.set(e.step, { total: e.total, done: e.done, failed: 0, startedAt: this.now(), doneAtStart: e.done, usage: NO_USAGE });
        if (e.done > 0) this.line(`  · ${e.step}: ${e.done} of ${e.total} items already saved; running the other ${e.total - e.done}`);
        break;
      case "task:start":
        if (!this.running.has(e.step)) this.running.set(e.step, { startedAt: this.now() });
        break;
      case "task:end": {
        const f = e.item !== undefined ? this.fanouts.get(e.step) : undefined;
        if (f) {
          f.done += 1;
          this.plainFanout(e.step, f);
        } else if (this.verbose && e.item !== undefined) this.line(`  · ${e.step}[${e.item}] done in ${formatDuration(e.durationMs)}`);
        break;
      }
      case "task:error": {
        const f = e.item !== undefined ? this.fanouts.get(e.step) : undefined;
        if (f) f.failed += 1;
        this.line(`✗ ${e.step}${e.item !== undefined ? `[${e.item}]` : ""} failed after ${formatDuration(e.durationMs)}: ${e.error.message}`);
        break;
      }
      case "task:retry":
        this.line(`  ↻ ${e.step}${e.item !== undefined ? `[${e.item}]` : ""} attempt ${e.failedAttempt} failed (${e.error.message}); retrying`);
        break;
      case "progress": {
        const r = this.running.get(e.step) ?? { startedAt: this.now() };
        Object.assign(r, { done: e.done, total: e.total, message: e.message });
        this.running.set(e.step, r);
        if (!this.io.live && this.now() - this.lastPlain > 15_000) {
          this.lastPlain = this.now();
          this.line(`  · ${e.step}: ${e.done}${e.total !== undefined ? `/${e.total}` : ""}${e.message ? ` ${e.message}` : ""}`);
        }
        break;
      }
      case "usage":
        this.spent = e.runTotal;
        break;
      case "log":
        this.line(`  · ${e.step}${e.item !== undefined ? `[${e.item}]` : ""}: ${e.message}`);
        break;
      case "stopping":
        // A signal's stop is announced by the command itself, as the signal arrives.
        if (e.reason !== "signal") this.line(`■ ${e.message}`);
        break;
      case "checkpoint":
        this.checkpoint(e);
        break;
    }
  };

  /** Steps that finished in this run. */
  stepsDone(): number {
    return this.stepsRun;
  }

  /** Stop redrawing and clear the live block (before the final report). */
  finish(): void {
    clearInterval(this.timer);
    this.timer = undefined;
    this.io.live?.clear();
  }

  private checkpoint(e: Extract<RunEvent, { type: "checkpoint" }>): void {
    if (e.step.startsWith("restart:")) {
      this.line(`↺ restarting from ${e.step.slice("restart:".length)}`);
      for (const s of this.steps.slice(this.steps.indexOf(e.step.slice("restart:".length)))) this.done.delete(s);
      return;
    }
    if (e.step === "input" || e.step === "start" || e.step === "fork" || e.tasks === 0) return;
    for (const s of e.step.split("+")) {
      this.running.delete(s);
      if (!e.internal) this.done.add(s);
    }
    if (e.internal) {
      // A fan-out's results were gathered: the fan-out step is finished.
      for (const s of e.step.split("+")) {
        const f = this.fanouts.get(s);
        this.fanouts.delete(s);
        this.done.add(s);
        const saved = f && f.doneAtStart > 0 ? ` (${f.doneAtStart} saved before this run)` : "";
        this.line(`✓ ${s.padEnd(24)} ${f ? plural(f.total, "item") : "no items"}${saved}${costText(addUsage(f?.usage, e.usage))}`);
        this.stepsRun += 1;
      }
      return;
    }
    const fanout = this.fanouts.get(e.step);
    if (fanout) {
      // The items' checkpoint; the line follows when they are gathered.
      fanout.usage = addUsage(fanout.usage, e.usage);
      return;
    }
    this.stepsRun += 1;
    const items = e.tasks > 1 ? `  ${e.tasks} tasks` : "";
    this.line(`✓ ${e.step.padEnd(24)} ${formatDuration(e.durationMs).padStart(8)}${items}${costText(e.usage)}`);
  }

  /** A permanent line: printed above the live block. */
  private line(text: string): void {
    if (this.io.live) {
      this.io.live.clear();
      this.io.err(text);
      this.draw();
    } else this.io.err(text);
  }

  private plainFanout(step: string, f: { total: number; done: number; failed: number }): void {
    // A short fan-out is over before a progress line would help; its ✓ line says it all.
    if (this.io.live || f.total < PLAIN_PROGRESS_MIN_ITEMS) return;
    const fraction = Math.floor((f.done / f.total) * 10);
    const elapsed = this.now() - this.lastPlain;
    if (fraction > (this.lastPlainFraction.get(step) ?? 0) || elapsed > 15_000) {
      this.lastPlainFraction.set(step, fraction);
      this.lastPlain = this.now();
      if (f.done < f.total) this.io.err(`  · ${step}: ${f.done}/${f.total} items${f.failed ? `, ${f.failed} failed` : ""}${this.spent.calls ? ` · ${formatUsd(this.spent.usd)} this run` : ""}`);
    }
  }

  private draw(): void {
    if (!this.io.live) return;
    const lines: string[] = [];
    for (const [step, r] of this.running) {
      const f = this.fanouts.get(step);
      if (f) {
        const ranNow = f.done - f.doneAtStart;
        const left = f.total - f.done;
        const elapsed = this.now() - f.startedAt;
        const eta = ranNow > 0 && left > 0 ? ` · ETA ${formatDuration((elapsed / ranNow) * left)}` : "";
        lines.push(`▸ ${step.padEnd(22)} ${bar(f.done / f.total)} ${f.done}/${f.total} items${f.failed ? ` · ${f.failed} failed` : ""}${eta}`);
      } else if (r.done !== undefined) {
        const fraction = r.total ? r.done / r.total : undefined;
        lines.push(`▸ ${step.padEnd(22)} ${fraction !== undefined ? `${bar(fraction)} ` : ""}${r.done}${r.total !== undefined ? `/${r.total}` : ""}${r.message ? ` ${r.message}` : ""}`);
      } else lines.push(`▸ ${step.padEnd(22)} running ${formatDuration(this.now() - r.startedAt)}`);
    }
    const total = this.steps.length ? ` · steps ${this.done.size}/${this.steps.length}` : "";
    const money = this.spent.calls || this.spentBefore.calls ? ` · ${formatUsd(addUsage(this.spent, this.spentBefore).usd)} spent (${formatUsd(this.spent.usd)} this run)` : "";
    lines.push(`  ${formatDuration(this.now() - this.startedAt)} elapsed${total}${money}`);
    this.io.live.update(lines.join("\n"));
  }
}

/** Fan-outs at least this wide get plain progress lines when there is no terminal. */
const PLAIN_PROGRESS_MIN_ITEMS = 20;

function bar(fraction: number, width = 20): string {
  const full = Math.max(0, Math.min(width, Math.round(fraction * width)));
  return `${"█".repeat(full)}${"░".repeat(width - full)}`;
}

function costText(usage: Usage): string {
  if (!usage.calls && !usage.usd) return "";
  const tokens = usage.inputTokens + usage.outputTokens;
  return `  ${formatUsd(usage.usd)}${tokens ? ` · ${formatTokens(tokens)} tokens` : ""}`;
}

export function formatTokens(n: number): string {
  return n >= 10_000 ? `${(n / 1000).toFixed(1)}k` : String(n);
}

/** One line about money: what was spent, in tokens and calls. */
export function describeUsage(usage: Usage): string {
  const tokens = usage.inputTokens || usage.outputTokens ? `${formatTokens(usage.inputTokens)} in + ${formatTokens(usage.outputTokens)} out tokens, ` : "";
  return `${formatUsd(usage.usd)} (${tokens}${plural(usage.calls, "model call")})`;
}
