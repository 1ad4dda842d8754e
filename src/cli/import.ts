import { importThread, latestTuple, openStore, readThreadExport, statusOf } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { flag, formatBytes, plural, shellArg, type Io } from "./render.ts";

export const usage = `cairn import <file.json | dir> [--thread <new-id>] [--store <uri>] [--json]

Load a thread written by cairn export into a store (file, SQLite, Postgres); cairn resume then continues it
where it stood. The whole file is checked first: a damaged, truncated or newer export writes nothing.
  --thread   the id to give the thread (default: its exported id; an existing thread is never overwritten)
  --json     print what was imported as JSON`;

export async function importCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("import", argv, { ...COMMON_OPTIONS, thread: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const source = onePositional("import", positionals, "an export file or directory (written by cairn export)");
  // Checked whole before the store is opened: a bad file leaves no trace in it (not even a new database).
  const exported = await readThreadExport(source);
  const store = await openStore(values.store);
  try {
    const summary = await importThread(store, exported, { thread: values.thread });
    if (values.json) {
      io.out(JSON.stringify(summary, null, 2));
      return 0;
    }
    const { from } = summary;
    const renamed = summary.thread === from.thread ? "" : ` as ${summary.thread}`;
    const artifacts = summary.artifacts.count
      ? `, ${plural(summary.artifacts.count, "artifact")} (${formatBytes(summary.artifacts.bytes)}, ${summary.artifacts.added} new to this store)`
      : "";
    io.out(`imported thread ${from.thread}${renamed} into ${summary.store}: ${plural(summary.checkpoints, "checkpoint")}, ${plural(summary.writes, "pending write")}${artifacts}`);
    io.out(`  from ${summary.from.source} (exported from a ${from.store} store by cairn ${from.cairn} at ${from.exportedAt}${from.checkpoint ? `, checkpoint ${from.checkpoint} only` : ""})`);
    const { status: found, next } = statusOf(await latestTuple(store.saver, summary.thread, store.uri));
    // No process writes the imported copy: a thread still running where it came from is stopped here.
    const status = found === "running" ? "interrupted" : found;
    const target = `${flag("thread", summary.thread)} ${flag("store", summary.store)}`;
    if (status === "completed") io.out(`  status: completed · see it with: cairn history ${shellArg(summary.thread)} ${flag("store", summary.store)}`);
    else io.out(`  status: ${status}${next.length ? ` · next: ${next.join(", ")}` : ""} · continue with: cairn resume <graph.ts> ${target}`);
    return 0;
  } finally {
    await store.close();
  }
}
