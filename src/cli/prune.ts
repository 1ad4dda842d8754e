import { CairnError, prune, type PruneReport, type ThreadStatus } from "../index.ts";
import { COMMON_OPTIONS, parse } from "./args.ts";
import { formatBytes, plural, table, type Io } from "./render.ts";

export const usage = `cairn prune [--keep-last <n>] [--older-than <age>] [--threads] [--status <status>] [--thread <id>] [--dry-run] [--grace <age>] [--store <uri>] [--json]

Remove old checkpoints to free space, then the artifacts no checkpoint refers to any more. Every thread keeps
its newest checkpoint and its saved work, so a resume is unaffected, and --from-step still works for cairn
workflows (a plain LangGraph graph needs the checkpoint before that step).
  --keep-last <n>     keep the n newest checkpoints of each thread
  --older-than <age>  remove checkpoints older than that: 45s, 90m, 12h, 30d, 2w (with --keep-last, a checkpoint
                      goes only if both say so)
  --threads           with --older-than: also remove whole threads whose newest checkpoint is that old
  --status <status>   only threads that are completed, failed, interrupted (several: completed,failed)
  --thread <id>       only this thread
  --dry-run           show what would be removed, remove nothing
  --grace <age>       keep artifacts put less than this long ago, referenced or not (default 1h)
A thread another process is running is skipped. Exit 2 when nothing matches (nothing is removed).`;

export async function pruneCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("prune", argv, {
    ...COMMON_OPTIONS,
    "keep-last": { type: "string" },
    "older-than": { type: "string" },
    threads: { type: "boolean", default: false },
    status: { type: "string", multiple: true },
    thread: { type: "string" },
    "dry-run": { type: "boolean", default: false },
    grace: { type: "string" },
  });
  if (values.help) return io.out(usage), 0;
  if (positionals.length) {
    throw new CairnError("INVALID_ARGUMENT", `cairn prune takes no arguments, got: ${positionals.join(" ")}. Name a thread with --thread <id>. See: cairn prune --help`);
  }
  const raw = values["keep-last"];
  if (raw !== undefined && !/^\d+$/.test(raw.trim())) {
    throw new CairnError("INVALID_ARGUMENT", `--keep-last ${JSON.stringify(raw)} is not a whole number. Pass how many of each thread's newest checkpoints to keep, e.g. --keep-last 5`);
  }
  const dryRun = values["dry-run"];
  const report = await prune({
    store: values.store,
    keepLast: raw === undefined ? undefined : Number(raw),
    olderThan: values["older-than"],
    threads: values.threads,
    status: values.status as ThreadStatus[] | undefined,
    thread: values.thread,
    dryRun,
    grace: values.grace,
  });
  if (values.json) io.out(JSON.stringify(report, null, 2));
  else render(io, report);
  for (const t of report.threads) if (t.skipped) io.err(`cairn: skipped thread ${t.thread}: ${t.skipped}.`);
  if (report.checkpointsRemoved === 0) {
    const filters = describeFilters(values);
    const what =
      report.matched === 0
        ? `no thread of ${report.store} matches ${filters}`
        : `no checkpoint of the ${plural(report.matched, "matching thread")} is covered by ${filters} (every thread keeps its newest checkpoint)`;
    io.err(`cairn: nothing to prune: ${what}. Nothing was removed.`);
    return 2;
  }
  return 0;
}

function render(io: Io, report: PruneReport): void {
  const done = report.threads.filter((t) => !t.skipped);
  if (done.length > 0) {
    const rows = [["THREAD", "STATUS", "CHECKPOINTS", report.dryRun ? "TO REMOVE" : "REMOVED", "KEPT", report.dryRun ? "TO FREE" : "FREED"]];
    for (const t of done) {
      rows.push([t.thread, t.status, String(t.checkpoints), t.removedThread ? "whole thread" : String(t.removed), String(t.checkpoints - t.removed), formatBytes(t.bytesFreed)]);
    }
    for (const line of table(rows)) io.out(line);
  }
  if (report.checkpointsRemoved === 0) return;
  const partial = done.filter((t) => !t.removedThread).length;
  const whole = report.threadsRemoved ? `${partial ? " and " : ""}${plural(report.threadsRemoved, "whole thread")}` : "";
  const from = partial ? `${plural(report.checkpointsRemoved - sumRemovedWhole(report), "checkpoint")} from ${plural(partial, "thread")}` : "";
  io.out(`${report.dryRun ? "would remove" : "removed"} ${from}${whole}; ${report.dryRun ? "would free" : "freed"} ${formatBytes(report.bytesFreed)}`);
  const a = report.artifacts;
  const kept = `kept ${a.referenced} referenced${a.recent ? `, ${a.recent} put within the last ${formatAge(a.graceMs)}` : ""}`;
  io.out(`artifacts: ${report.dryRun ? "would remove" : "removed"} ${a.removed.length} that no checkpoint refers to${a.removed.length ? ` (${formatBytes(a.bytesFreed)})` : ""}; ${kept}`);
  io.out(`${report.dryRun ? "would free" : "freed"} ${formatBytes(report.bytesFreed + a.bytesFreed)} in all${report.dryRun ? " (dry run: nothing was removed)" : ""}`);
}

function sumRemovedWhole(report: PruneReport): number {
  return report.threads.filter((t) => t.removedThread).reduce((sum, t) => sum + t.removed, 0);
}

/** The filters as they were given, for messages. */
function describeFilters(values: { "keep-last"?: string; "older-than"?: string; threads?: boolean; status?: string[]; thread?: string }): string {
  const parts: string[] = [];
  if (values["keep-last"] !== undefined) parts.push(`--keep-last ${values["keep-last"]}`);
  if (values["older-than"] !== undefined) parts.push(`--older-than ${values["older-than"]}`);
  if (values.threads) parts.push("--threads");
  if (values.status?.length) parts.push(`--status ${values.status.join(",")}`);
  if (values.thread !== undefined) parts.push(`--thread ${values.thread}`);
  return parts.join(" ");
}

/** Milliseconds as the largest whole unit: 1h, 30m, 2d. */
export function formatAge(ms: number): string {
  for (const [unit, size] of [["w", 604_800_000], ["d", 86_400_000], ["h", 3_600_000], ["m", 60_000], ["s", 1000]] as const) {
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${Math.round(ms / 1000)}s`;
}
