import { formatUsd, isEmptyUsage, latestTuple, openStore, readHistory, spentInAll, statusOf } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { describeUsage, formatTokens } from "./progress.ts";
import { formatDuration, table, type Io } from "./render.ts";

export const usage = `cairn history <thread> [--store <uri>] [--json]

List a thread's checkpoints, oldest first: id, step, time, duration, tasks, the step's cost and tokens, the
thread's running total, source.
Use an id with: cairn resume <graph.ts> --thread <thread> --checkpoint <id>, or cairn inspect <thread> --checkpoint <id>.`;

export async function historyCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("history", argv, COMMON_OPTIONS);
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("history", positionals, "a thread id");
  const store = await openStore(values.store);
  try {
    const tuple = await latestTuple(store.saver, thread, store.uri);
    const history = await readHistory(store.saver, thread);
    if (values.json) {
      io.out(JSON.stringify(history, null, 2));
      return 0;
    }
    const rows = [["#", "CHECKPOINT", "STEP", "TIME", "DURATION", "TASKS", "COST", "TOKENS", "TOTAL", "SOURCE"]];
    history.forEach((h, i) => {
      const cost = h.usage && !isEmptyUsage(h.usage) ? [formatUsd(h.usage.usd), formatTokens(h.usage.inputTokens + h.usage.outputTokens)] : ["", ""];
      rows.push([String(i + 1), h.id, h.step, h.ts, formatDuration(h.durationMs), h.tasks ? String(h.tasks) : "", ...cost, h.total ? formatUsd(h.total.usd) : "", h.source]);
    });
    for (const line of table(rows)) io.out(line);
    const first = history[0];
    if (first?.parent && !history.some((h) => h.id === first.parent)) io.out("(older checkpoints were pruned)");
    const { status, next } = statusOf(tuple);
    const spent = await spentInAll(store.saver, thread);
    io.out(`status: ${status}${next.length ? ` · next: ${next.join(", ")}` : ""}${isEmptyUsage(spent) ? "" : ` · spent ${describeUsage(spent)}`}`);
    return 0;
  } finally {
    await store.close();
  }
}
