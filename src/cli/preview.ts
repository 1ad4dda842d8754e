import { formatUsd, isEmptyUsage, type ResumePlan } from "../index.ts";
import { describeUsage } from "./progress.ts";
import { flag, shellArg, type Io } from "./render.ts";

/**
 * `cairn resume --dry-run`: the plan as a table on stdout (or JSON). Exit 0 when the resume would run
 * (or has nothing to do), 2 when it would be refused.
 */
export function renderPreview(io: Io, plan: ResumePlan, options: { file: string; store: string | undefined; json: boolean }): number {
  const code = plan.outcome === "refused" ? 2 : 0;
  if (options.json) {
    io.out(JSON.stringify(plan, null, 2));
    return code;
  }
  const from = plan.from.kind === "latest" ? "its latest checkpoint" : plan.from.kind === "checkpoint" ? `checkpoint ${plan.from.id}` : `before step ${plan.from.step}`;
  io.out(`Resume preview for thread ${plan.thread} from ${from} (store ${plan.store}); nothing was run or written.`);
  if (plan.outcome === "already-completed") {
    io.out(`The thread already completed: a resume would run nothing. To rerun part of it, preview --from-step <step>.`);
    return code;
  }
  const rows = plan.steps.map((s) => [
    s.step,
    s.action,
    s.reason ?? "",
    s.items ? `${s.items.saved}/${s.items.total} saved, ${s.items.toRun} to run${s.items.failed ? ` (${s.items.failed} failed)` : ""}` : "",
    isEmptyUsage(s.spent) ? "" : formatUsd(s.spent.usd),
  ]);
  const head = ["STEP", "ACTION", "WHY", "ITEMS", "SPENT"];
  const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => `  ${cells.map((c, i) => c.padEnd(widths[i]!)).join("  ")}`.trimEnd();
  io.out(line(head));
  for (const r of rows) io.out(line(r));
  const runNow = plan.steps.filter((s) => s.action === "run");
  const items = runNow.reduce((n, s) => n + (s.items?.toRun ?? 0), 0);
  const reused = plan.steps.filter((s) => s.action === "reuse").length;
  io.out(
    `${reused} step${reused === 1 ? "" : "s"} reused; runs first: ${runNow.map((s) => s.step).join(", ") || "nothing"}${items ? ` (${items} item${items === 1 ? "" : "s"})` : ""}.` +
      (isEmptyUsage(plan.reused) ? "" : ` Reused work cost ${describeUsage(plan.reused)}; the resume does not pay for it again.`),
  );
  for (const n of plan.notices) io.out(`note: ${n}`);
  if (plan.refusal) {
    const where = `${shellArg(options.file)}${options.store ? ` ${flag("store", options.store)}` : ""}`;
    io.out(`\nA resume would be refused (${plan.refusal.code}):`);
    io.out(plan.refusal.message.replaceAll("cairn resume …", `cairn resume ${where}`).replaceAll("cairn run …", `cairn run ${where}`));
  }
  return code;
}
