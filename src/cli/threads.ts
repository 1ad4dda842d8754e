import { formatUsd, listThreads, openStore } from "../index.ts";
import { COMMON_OPTIONS, parse } from "./args.ts";
import { formatTokens } from "./progress.ts";
import { formatBytes, table, type Io } from "./render.ts";
import { CairnError } from "../index.ts";

export const usage = `cairn threads [--store <uri>] [--json]

List the threads of a store: id, status (completed / failed / interrupted / running), last step, checkpoints,
disk use, money and tokens spent on model calls, last update. Disk use is the thread's folder on the file
store, and the stored bytes of its rows on SQLite and Postgres (approximate). Free space with cairn prune or cairn rm.`;

export async function threadsCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("threads", argv, COMMON_OPTIONS);
  if (values.help) return io.out(usage), 0;
  if (positionals.length) throw new CairnError("INVALID_ARGUMENT", `cairn threads takes no arguments, got: ${positionals.join(" ")}. See: cairn threads --help`);
  const store = await openStore(values.store);
  try {
    const threads = await listThreads(store.saver, await store.listThreadIds(), { bytes: (t) => store.threadBytes(t) });
    if (values.json) {
      io.out(JSON.stringify(threads, null, 2));
      return 0;
    }
    if (threads.length === 0) {
      io.out(`No threads in ${store.uri}. Start one with: cairn run <graph.ts>`);
      return 0;
    }
    const rows = [["THREAD", "STATUS", "LAST STEP", "CHECKPOINTS", "SIZE", "SPENT", "TOKENS", "UPDATED"]];
    for (const t of threads) {
      rows.push([t.thread, t.status, t.lastStep, String(t.checkpoints), formatBytes(t.bytes ?? 0), formatUsd(t.spent.usd), formatTokens(t.spent.inputTokens + t.spent.outputTokens), t.updated]);
    }
    for (const line of table(rows)) io.out(line);
    return 0;
  } finally {
    await store.close();
  }
}
