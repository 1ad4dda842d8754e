import { exportThread, openStore, writeThreadExport } from "../index.ts";
import { COMMON_OPTIONS, onePositional, parse } from "./args.ts";
import { formatBytes, plural, type Io } from "./render.ts";

export const usage = `cairn export <thread> [--checkpoint <id>] [--out <file.json> | --out <dir>/] [--store <uri>] [--json]

Write a thread as one portable JSON document: every checkpoint of every branch, metadata (steps, spend),
pending writes and the artifacts its state refers to. Load it into any store with cairn import.
  (no --out)     the document on stdout, artifacts inline: cairn export <thread> > thread.json
  --out <file>   the same, written to a file
  --out <dir>/   a directory: <dir>/thread.json and <dir>/artifacts/<sha256>.<ext> (for large artifacts)
  --checkpoint   only this checkpoint and its pending writes; it becomes the imported thread's root
  --json         with --out: print what was written as JSON`;

export async function exportCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("export", argv, { ...COMMON_OPTIONS, checkpoint: { type: "string" }, out: { type: "string" } });
  if (values.help) return io.out(usage), 0;
  const thread = onePositional("export", positionals, "a thread id");
  const store = await openStore(values.store);
  try {
    const options = { checkpoint: values.checkpoint };
    if (values.out === undefined) {
      const document = await exportThread(store, thread, options);
      io.out(JSON.stringify(document, null, 2));
      const bytes = document.artifacts.reduce((n, a) => n + a.size, 0);
      const writes = document.checkpoints.reduce((n, c) => n + c.writes.length, 0);
      io.err(`exported thread ${thread} from ${store.uri}: ${describe(document.checkpoints.length, writes, document.artifacts.length, bytes)}`);
      return 0;
    }
    const summary = await writeThreadExport(store, thread, values.out, options);
    if (values.json) io.out(JSON.stringify(summary, null, 2));
    io.err(
      `exported thread ${thread} from ${store.uri} to ${summary.path}: ${describe(summary.checkpoints, summary.writes, summary.artifacts.count, summary.artifacts.bytes)}`,
    );
    return 0;
  } finally {
    await store.close();
  }
}

function describe(checkpoints: number, writes: number, artifacts: number, bytes: number): string {
  return `${plural(checkpoints, "checkpoint")}, ${plural(writes, "pending write")}, ${plural(artifacts, "artifact")}${artifacts ? ` (${formatBytes(bytes)})` : ""}`;
}
