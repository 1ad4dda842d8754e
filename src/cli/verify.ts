import { CairnError, openStore, verifyStore } from "../index.ts";
import { COMMON_OPTIONS, parse } from "./args.ts";
import type { Io } from "./render.ts";

export const usage = `cairn verify [<thread>] [--store <uri>] [--json]

Scan the store (or one thread) for damage: every journal record's checksum and structure, every checkpoint
read back whole, every artifact's bytes against their hash. Reports each damaged record (thread, file, byte,
what is wrong, which checkpoints it costs). Exit 0 when everything is intact, 1 when damage was found.
Continue a damaged thread from its newest intact checkpoint with: cairn resume <graph.ts> --thread <id> --fallback`;

export async function verifyCommand(argv: string[], io: Io): Promise<number> {
  const { values, positionals } = parse("verify", argv, COMMON_OPTIONS);
  if (values.help) return io.out(usage), 0;
  if (positionals.length > 1) {
    throw new CairnError("INVALID_ARGUMENT", `cairn verify takes at most one thread id, got ${positionals.length}: ${positionals.join(" ")}. See: cairn verify --help`);
  }
  const thread = positionals[0];
  const store = await openStore(values.store);
  try {
    const report = await verifyStore(store, thread !== undefined ? { thread } : {});
    if (values.json) {
      io.out(JSON.stringify(report, null, 2));
      return report.problems.length > 0 ? 1 : 0;
    }
    for (const p of report.problems) {
      io.out(`DAMAGED ${p.file}${p.offset !== undefined ? ` byte ${p.offset}` : ""}${p.thread !== undefined ? ` (thread ${p.thread})` : ""}`);
      io.out(`  ${p.what}`);
      for (const c of p.checkpoints) io.out(`  checkpoint ${c.checkpoint}: ${c.why}`);
    }
    for (const note of report.notes) io.out(`note: ${note}`);
    const checked = `${report.threads} thread${report.threads === 1 ? "" : "s"}, ${report.checkpoints} checkpoints, ${report.artifacts} artifacts checked`;
    if (report.problems.length === 0) {
      io.out(`${checked}: all intact.`);
      return 0;
    }
    const damagedThreads = [...new Set(report.problems.map((p) => p.thread).filter((t): t is string => t !== undefined))];
    io.out(`${checked}: ${report.problems.length} damaged.`);
    if (damagedThreads.length > 0) {
      io.out(`Continue a damaged thread from its newest intact checkpoint: cairn resume <graph.ts> --thread ${damagedThreads[0]} --fallback${values.store ? ` --store ${values.store}` : ""}`);
    }
    return 1;
  } finally {
    await store.close();
  }
}
