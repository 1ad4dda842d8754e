/**
 * Damage to a real store after a real run: each kind is detected on read (CHECKPOINT_CORRUPT naming
 * the file), reported by `cairn verify` (exit 1), refused by a plain resume (nothing written), and
 * resumed with --fallback from the right checkpoint to the state an uninterrupted run ends in.
 */
import { createHash } from "node:crypto";
import { readdir, readFile, truncate, unlink, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { afterAll, describe, expect, it } from "vitest";
import { isCairnError, openStore, readHistory, resume, run, verifyStore, type OpenedStore } from "../src/index.ts";
import pipeline from "./fixtures/pipeline-graph.ts";
import { cairn, removeWorkdirs, workdir } from "./helpers/cli.ts";

afterAll(removeWorkdirs);

const INPUT = { frames: 2, delayMs: 0 };
const storeOf = (cwd: string) => `file:${join(cwd, ".cairn")}`;
const journalOf = (cwd: string, thread: string) => join(cwd, ".cairn", "threads", thread, "journal.log");

interface Line {
  offset: number;
  length: number;
  record: { k: string; id?: string; cp?: unknown };
}

async function lines(file: string): Promise<Line[]> {
  const bytes = await readFile(file);
  const out: Line[] = [];
  let pos = 0;
  while (pos < bytes.length) {
    const nl = bytes.indexOf(0x0a, pos);
    const text = bytes.toString("utf8", pos, nl);
    out.push({ offset: pos, length: nl + 1 - pos, record: JSON.parse(text.slice(text.indexOf(" ", 9) + 1)) as Line["record"] });
    pos = nl + 1;
  }
  return out;
}

async function withStore<T>(cwd: string, fn: (store: OpenedStore) => Promise<T>): Promise<T> {
  const store = await openStore(storeOf(cwd));
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

/** A finished pipeline thread, made through the API: its state, and its root checkpoint ids oldest first. */
async function finishedThread(thread: string) {
  const cwd = await workdir();
  const r = await run(pipeline, { thread, input: INPUT, store: storeOf(cwd) });
  expect(r.status).toBe("completed");
  const ids = await withStore(cwd, async (s) => (await readHistory(s.saver, thread)).map((h) => h.id));
  return { cwd, state: r.state, ids, file: journalOf(cwd, thread) };
}

async function rejection(p: Promise<unknown>): Promise<Error & { code?: string; details?: Record<string, unknown> }> {
  try {
    await p;
  } catch (error) {
    return error as Error;
  }
  throw new Error("expected a rejection");
}

function setByte(bytes: Buffer, offset: number): void {
  bytes[offset] = bytes[offset] === 0x41 ? 0x42 : 0x41;
}

const damages: { name: string; skipped: (ids: string[]) => string; inject: (file: string, ls: Line[], ids: string[]) => Promise<number> }[] = [
  {
    name: "a checksum mismatch in the newest checkpoint's record (a flipped byte)",
    skipped: (ids) => ids.at(-1)!,
    inject: async (file, ls, ids) => {
      const target = ls.find((l) => l.record.id === ids.at(-1))!;
      const bytes = await readFile(file);
      setByte(bytes, target.offset + Math.floor(target.length / 2));
      await writeFile(file, bytes);
      return target.offset;
    },
  },
  {
    name: "garbled bytes over the newest checkpoint's record (nothing of it can be told)",
    // What the garbled record held cannot be told: the checkpoint before it may have lost task results too.
    skipped: (ids) => ids.at(-2)!,
    inject: async (file, ls, ids) => {
      const target = ls.find((l) => l.record.id === ids.at(-1))!;
      const bytes = await readFile(file);
      bytes.fill(0x7e, target.offset, target.offset + target.length - 1);
      await writeFile(file, bytes);
      return target.offset;
    },
  },
  {
    name: "a journal cut short in the middle (the newest record's bytes partly gone, the records after it intact)",
    skipped: (ids) => ids.at(-2)!,
    inject: async (file, ls, ids) => {
      const target = ls.find((l) => l.record.id === ids.at(-1))!;
      const bytes = await readFile(file);
      const cut = Buffer.concat([bytes.subarray(0, target.offset + 40), bytes.subarray(target.offset + target.length - 1)]);
      await writeFile(file, cut);
      return target.offset;
    },
  },
  {
    name: "a record whose checksum holds but whose structure is wrong (a checkpoint without its values)",
    skipped: (ids) => ids.at(-1)!,
    inject: async (file, ls, ids) => {
      const target = ls.find((l) => l.record.id === ids.at(-1))!;
      const bytes = await readFile(file);
      const text = bytes.toString("utf8", target.offset, target.offset + target.length - 1);
      const batch = text.slice(9, text.indexOf(" ", 9));
      const json = JSON.stringify({ ...target.record, blobs: undefined, cp: "nonsense" });
      const body = `${batch} ${json}`;
      const line = Buffer.from(`${crc32(body).toString(16).padStart(8, "0")} ${body}\n`);
      await writeFile(file, Buffer.concat([bytes.subarray(0, target.offset), line, bytes.subarray(target.offset + target.length)]));
      return target.offset;
    },
  },
];

describe("damage to a file store journal", () => {
  for (const damage of damages) {
    it(`${damage.name}: detected on read, by cairn verify, refused by a plain resume, resumed with --fallback`, async () => {
      const thread = "t";
      const { cwd, state, ids, file } = await finishedThread(thread);
      const offset = await damage.inject(file, await lines(file), ids);

      // On read: CHECKPOINT_CORRUPT naming the file and byte, and the two ways on.
      const error = await rejection(withStore(cwd, (s) => s.saver.getTuple({ configurable: { thread_id: thread } })));
      expect(isCairnError(error, "CHECKPOINT_CORRUPT")).toBe(true);
      expect(error.message).toContain(`${file} of thread "t" is damaged at byte ${offset}`);
      expect(error.message).toContain("cairn verify t");
      expect(error.message).toContain("--fallback");

      // cairn verify: exit 1, names the file and byte.
      const v = await cairn(cwd, ["verify", "--store", storeOf(cwd)]);
      expect(v.code, v.stderr).toBe(1);
      expect(v.stdout).toContain(`DAMAGED ${file} byte ${offset} (thread t)`);
      expect(v.stdout).toMatch(/1 thread, \d+ checkpoints, 3 artifacts checked: \d+ damaged\./);

      // A plain resume refuses and writes nothing.
      const before = await readFile(file);
      const refused = await cairn(cwd, ["resume", "test/fixtures/pipeline-graph.ts", "--thread", thread, "--store", storeOf(cwd)]);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toContain(`cairn: Checkpoint journal ${file} of thread "t" is damaged at byte ${offset}`);
      expect(refused.stderr).toContain("`cairn verify t`");
      expect(refused.stderr).toMatch(/`cairn resume test\/fixtures\/pipeline-graph\.ts .*--thread t --fallback`/);
      expect(await readFile(file)).toEqual(before);

      // --fallback: announced, from the newest intact checkpoint, to the uninterrupted state.
      const skipped = damage.skipped(ids);
      const resumed = await resume(pipeline, {
        thread,
        store: storeOf(cwd),
        fallback: true,
        onStart: (info) => {
          expect(info.notices.some((n) => n.startsWith(`--fallback: set aside the damaged record at byte ${offset} of ${file}`))).toBe(true);
          expect(info.notices.some((n) => n.startsWith(`--fallback: skipped checkpoint ${skipped}`))).toBe(true);
          const from = ids[ids.indexOf(skipped) - 1];
          expect(info.notices.some((n) => n.startsWith(`--fallback: continuing from checkpoint ${from}`)), info.notices.join("\n")).toBe(true);
        },
      });
      expect(resumed.status).toBe("completed");
      expect(resumed.state).toEqual(state);

      // The damaged checkpoint is never served again; the thread reads normally; verify is clean.
      await withStore(cwd, async (s) => {
        const history = (await readHistory(s.saver, thread)).map((h) => h.id);
        expect(history).not.toContain(skipped);
        const report = await verifyStore(s);
        expect(report.problems).toEqual([]);
        expect(report.notes.some((n) => n.includes(`byte ${offset}`) && n.includes("set aside")), report.notes.join("\n")).toBe(true);
      });
      expect((await cairn(cwd, ["verify", "t", "--store", storeOf(cwd)])).code).toBe(0);
    });
  }

  it("a torn tail (the last record half-written by a crash) stays silently ignored", async () => {
    const { cwd, ids, file } = await finishedThread("t");
    const ls = await lines(file);
    // A crash leaves no clean-close mark; cut the last record in half.
    const last = ls.filter((l) => l.record.k !== "end").at(-1)!;
    await truncate(file, last.offset + Math.floor(last.length / 2));
    await withStore(cwd, async (s) => {
      const tuple = await s.saver.getTuple({ configurable: { thread_id: "t" } });
      expect(tuple?.config.configurable?.checkpoint_id).toBe(last.record.k === "cp" ? ids.at(-2) : ids.at(-1));
      expect((await verifyStore(s)).problems).toEqual([]);
    });
  });

  it("a zero-length journal beside step files is CHECKPOINT_CORRUPT, and verify reports it", async () => {
    const { cwd, file } = await finishedThread("t");
    await truncate(file, 0);
    const error = await rejection(withStore(cwd, (s) => s.saver.getTuple({ configurable: { thread_id: "t" } })));
    expect(isCairnError(error, "CHECKPOINT_CORRUPT")).toBe(true);
    expect(error.message).toContain(`Checkpoint journal ${file} of thread "t" holds no intact record (0 bytes)`);
    const v = await cairn(cwd, ["verify", "--store", storeOf(cwd)]);
    expect(v.code).toBe(1);
    expect(v.stdout).toContain(`DAMAGED ${file} byte 0 (thread t)`);
  });

  it("a garbled or missing store marker is reported", async () => {
    const { cwd } = await finishedThread("t");
    const marker = join(cwd, ".cairn", "cairn-store.json");
    await writeFile(marker, "{garbled");
    const error = await rejection(withStore(cwd, (s) => s.saver.getTuple({ configurable: { thread_id: "t" } })));
    expect(isCairnError(error, "CHECKPOINT_CORRUPT")).toBe(true);
    expect(error.message).toContain(marker);
    await withStore(cwd, async (s) => {
      expect((await verifyStore(s)).problems).toEqual([{ file: marker, what: "the store marker is not valid JSON", checkpoints: [] }]);
    });
    await unlink(marker);
    const v = await cairn(cwd, ["verify", "--store", storeOf(cwd), "--json"]);
    expect(v.code).toBe(1);
    expect(JSON.parse(v.stdout).problems).toEqual([{ file: marker, what: "the store marker is missing though the store has threads", checkpoints: [] }]);
  });
});

describe("damage to artifact files", () => {
  for (const [name, corrupt] of [
    ["zero-length", () => Buffer.alloc(0)],
    ["garbled", (b: Buffer) => Buffer.from(b.map((x, i) => (i > 10 ? x ^ 0xff : x)))],
    ["truncated", (b: Buffer) => b.subarray(0, b.length >> 1)],
  ] as const) {
    it(`a ${name} artifact: CHECKPOINT_CORRUPT naming the file on get, and reported by cairn verify`, async () => {
      const { cwd, state } = await finishedThread("t");
      const ref = state.cover!;
      const folder = join(cwd, ".cairn", "artifacts", ref.sha256.slice(0, 2));
      const path = join(folder, (await readdir(folder)).find((n) => n.startsWith(ref.sha256))!);
      await writeFile(path, corrupt(await readFile(path)));
      expect(createHash("sha256").update(await readFile(path)).digest("hex")).not.toBe(ref.sha256);

      const error = await rejection(withStore(cwd, (s) => s.artifacts.get(ref)));
      expect(isCairnError(error, "CHECKPOINT_CORRUPT")).toBe(true);
      expect(error.message).toContain(`Artifact ${path} is damaged`);

      const v = await cairn(cwd, ["verify", "--store", storeOf(cwd)]);
      expect(v.code).toBe(1);
      expect(v.stdout).toContain(`DAMAGED ${path}\n  artifact sha256:${ref.sha256.slice(0, 12)}… is damaged: `);
    });
  }
});

describe("cairn verify on SQLite", () => {
  it("decodes every checkpoint and hashes every artifact; says what it cannot check", async () => {
    const cwd = await workdir();
    const uri = `sqlite:${join(cwd, "store.db")}`;
    await run(pipeline, { thread: "s", input: INPUT, store: uri });
    const v = await cairn(cwd, ["verify", "--store", uri]);
    expect(v.code, v.stderr).toBe(0);
    expect(v.stdout).toContain("note: SQLite: every checkpoint was decoded with the serializer; the database's own pages are not checked here (run PRAGMA integrity_check for that)");
    expect(v.stdout).toMatch(/1 thread, \d+ checkpoints, 3 artifacts checked: all intact\./);
    const unknown = await cairn(cwd, ["verify", "nope", "--store", uri]);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain(`No thread "nope"`);
  });
});
