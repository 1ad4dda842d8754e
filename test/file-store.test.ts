import { spawnSync } from "node:child_process";
import { expectCode, rejection } from "./helpers/errors.ts";
import { appendFile, mkdir, mkdtemp, readdir, readFile, rm, stat, truncate, writeFile } from "node:fs/promises";
import { hostname, tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { crc32 } from "node:zlib";
import type { RunnableConfig } from "@langchain/core/runnables";
import { uuid6, type ChannelVersions, type Checkpoint, type CheckpointMetadata, type CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { afterEach, describe, expect, it } from "vitest";
import { z } from "zod";
import {
  FILE_STORE_FORMAT_VERSION,
  FileCheckpointSaver,
  isCairnError,
  readHistory,
  resume,
  run,
  workflow,
  type CairnError,
  type CairnErrorCode,
  type FileCheckpointSaverOptions,
} from "cairn";

/**
 * The file store's promises to a user, checked on a real directory through the saver's public methods:
 * a crash mid-write loses only the unacknowledged write, damage to committed data is reported (never
 * served), several savers on one directory never serve each other's stale or wrong data, unchanged
 * channels are stored once, and thread ids become safe folder names.
 *
 * The journal layout these tests cut and damage (documented in src/store/journal.ts):
 * `<store>/threads/<thread>/journal.log`, one record per line, `<crc32 8 hex> <batch hex> <json>\n`.
 */

// -------------------------------------------------------------------------------------------------
// Helpers

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  // Newest first: savers close before their directory is removed.
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => {});
});

async function tempStore(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-file-store-"));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

/** A saver on `dir`, closed after the test. Several savers on one directory stand for several processes. */
function saverOn(dir: string, options: Omit<FileCheckpointSaverOptions, "dir"> = {}): FileCheckpointSaver {
  const saver = new FileCheckpointSaver({ dir, ...options });
  cleanups.push(() => saver.close());
  return saver;
}

const journalOf = (dir: string, thread: string) => join(dir, "threads", thread, "journal.log");

function config(thread: string, checkpointId?: string): RunnableConfig {
  return { configurable: { thread_id: thread, checkpoint_ns: "", ...(checkpointId !== undefined ? { checkpoint_id: checkpointId } : {}) } };
}

/** A checkpoint shaped like those of @langchain/langgraph-checkpoint-validation's test_utils. */
function makeCheckpoint(channel_values: Record<string, unknown>, channel_versions: ChannelVersions): Checkpoint {
  return { v: 4, id: uuid6(-1), ts: new Date().toISOString(), channel_values, channel_versions, versions_seen: { "": { someChannel: 1 } } };
}

const metadataAt = (step: number): CheckpointMetadata => ({ source: step < 0 ? "input" : "loop", step, parents: {} });

interface Put {
  id: string;
  values: Record<string, unknown>;
}

/**
 * Put `count` checkpoints as a chain (each the child of the one before, the first the child of `after`).
 * Every checkpoint changes both of its channels, with values that name the writer, so any mix-up shows.
 */
async function putChain(saver: FileCheckpointSaver, thread: string, count: number, options: { after?: Put; label?: string } = {}): Promise<Put[]> {
  const puts: Put[] = [];
  let parent = options.after;
  const first = parent ? Number(parent.values.n) + 1 : 0;
  for (let n = first; n < first + count; n += 1) {
    const values = { n, text: `${options.label ?? "put"} #${n} on ${thread}` };
    const checkpoint = makeCheckpoint(values, { n: n + 1, text: n + 1 });
    await saver.put(config(thread, parent?.id), checkpoint, metadataAt(n - 1), { n: n + 1, text: n + 1 });
    parent = { id: checkpoint.id, values };
    puts.push(parent);
  }
  return puts;
}

async function latestOf(saver: FileCheckpointSaver, thread: string): Promise<CheckpointTuple | undefined> {
  return saver.getTuple(config(thread));
}

async function listAll(saver: FileCheckpointSaver, thread: string): Promise<CheckpointTuple[]> {
  const all: CheckpointTuple[] = [];
  for await (const tuple of saver.list(config(thread))) all.push(tuple);
  return all;
}

async function idsOf(saver: FileCheckpointSaver, thread: string): Promise<string[]> {
  return (await listAll(saver, thread)).map((t) => t.checkpoint.id).sort();
}


interface JournalLine {
  offset: number;
  /** Bytes including the newline (when there is one). */
  length: number;
  batch: number;
  record: { k?: string; id?: string; task?: string; v?: number };
}

/** The journal's lines as a reader of the documented format sees them (every line here must be intact). */
async function journalLines(file: string): Promise<JournalLine[]> {
  const bytes = await readFile(file);
  const lines: JournalLine[] = [];
  let pos = 0;
  while (pos < bytes.length) {
    const nl = bytes.indexOf(0x0a, pos);
    const end = nl === -1 ? bytes.length : nl;
    const match = /^([0-9a-f]{8}) ([0-9a-f]{8,}) (.*)$/s.exec(bytes.toString("utf8", pos, end));
    if (!match) throw new Error(`journal line at byte ${pos} does not have the documented layout`);
    lines.push({ offset: pos, length: end + (nl === -1 ? 0 : 1) - pos, batch: parseInt(match[2]!, 16), record: JSON.parse(match[3]!) as JournalLine["record"] });
    pos = end + 1;
  }
  return lines;
}

/** Change the byte at `offset` to another printable byte (never a newline), as bit rot would. */
async function damageByte(file: string, offset: number): Promise<void> {
  const bytes = await readFile(file);
  const old = bytes[offset];
  if (old === undefined || old === 0x0a) throw new Error(`no damageable byte at ${offset}`);
  bytes[offset] = old === 0x41 ? 0x42 : 0x41;
  await writeFile(file, bytes);
}

/** A journal line in the documented format, checksummed, for a record a test writes by hand. */
function journalLine(json: string, batch: number): string {
  const body = `${batch.toString(16).padStart(8, "0")} ${json}`;
  return `${crc32(body).toString(16).padStart(8, "0")} ${body}\n`;
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * What a killed process leaves: its files closed by the OS and its writer lock still on disk, naming a
 * process that no longer exists.
 */
async function crash(saver: FileCheckpointSaver, dir: string, thread: string): Promise<void> {
  await saver.close();
  // A killed process never appends the "end" record of a clean close.
  const file = journalOf(dir, thread);
  const last = (await journalLines(file)).at(-1);
  if (last?.record.k === "end") await truncate(file, last.offset);
  const dead = spawnSync(process.execPath, ["-e", ""]).pid;
  const lock = join(dir, "threads", thread, "writer.lock");
  await writeFile(lock, JSON.stringify({ pid: dead, host: hostname(), since: new Date().toISOString(), saver: "killed" }) + "\n");
}

// -------------------------------------------------------------------------------------------------
// Crash recovery

describe("FileCheckpointSaver: a torn tail (a crash mid-write) loses only the unacknowledged write", () => {
  const tears = [
    { name: "the last line cut in the middle", cut: (last: JournalLine) => last.offset + Math.floor(last.length / 2) },
    { name: "only the last line's newline missing", cut: (last: JournalLine) => last.offset + last.length - 1 },
  ];
  for (const tear of tears) {
    it(`${tear.name}: a new saver reads the checkpoint before it, and writes after it cleanly`, async () => {
      const dir = await tempStore();
      const first = saverOn(dir);
      const puts = await putChain(first, "t", 3);
      await crash(first, dir, "t");
      const file = journalOf(dir, "t");
      const last = (await journalLines(file)).at(-1)!;
      expect(last.record.id).toBe(puts[2]!.id);
      await truncate(file, tear.cut(last));

      const reopened = saverOn(dir);
      const latest = await latestOf(reopened, "t");
      expect(latest?.checkpoint.id).toBe(puts[1]!.id);
      expect(latest?.checkpoint.channel_values).toEqual(puts[1]!.values);
      expect(await idsOf(reopened, "t")).toEqual([puts[0]!.id, puts[1]!.id].sort());

      const [next] = await putChain(reopened, "t", 1, { after: puts[1]!, label: "after the crash" });
      await reopened.close();

      // The torn bytes were cut off before the new record was appended: a third reader sees a clean file.
      const third = saverOn(dir);
      expect(await idsOf(third, "t")).toEqual([puts[0]!.id, puts[1]!.id, next!.id].sort());
      expect((await latestOf(third, "t"))?.checkpoint.channel_values).toEqual(next!.values);
      expect((await third.getTuple(config("t", puts[1]!.id)))?.checkpoint.channel_values).toEqual(puts[1]!.values);
      const lines = await journalLines(file);
      // Each writer opens with a "gen" record (its generation takes the thread).
      expect(lines.map((l) => (l.record.k === "cp" ? l.record.id : l.record.k))).toEqual(["hdr", "gen", puts[0]!.id, puts[1]!.id, "gen", next!.id, "end"]);
    });
  }

  it("a batch torn inside its first line (later lines of the batch intact) opens cleanly without that batch", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    const [parent] = await putChain(saver, "t", 1);
    // Tasks of one superstep save their writes concurrently; the journal commits queued ones together.
    const tasks = Array.from({ length: 6 }, (_, i) => `task-${i}`);
    await Promise.all(tasks.map((task, i) => saver.putWrites(config("t", parent!.id), [["out", `result of ${task}`], ["extra", i]], task)));
    await crash(saver, dir, "t");

    const file = journalOf(dir, "t");
    const lines = await journalLines(file);
    const writeLines = lines.filter((l) => l.record.k === "w");
    expect(writeLines.map((l) => l.record.task).sort()).toEqual(tasks);
    const lastBatch = writeLines.filter((l) => l.batch === writeLines.at(-1)!.batch);
    expect(lastBatch.length, "several task writes committed in one write share a batch offset").toBeGreaterThan(1);
    expect(lastBatch[0]!.offset).toBe(lastBatch[0]!.batch);
    const tornTasks = new Set(lastBatch.map((l) => l.record.task!));
    const committedTasks = tasks.filter((t) => !tornTasks.has(t));

    // As if the crash hit before the batch's fdatasync: its first line never reached the disk intact.
    await damageByte(file, lastBatch[0]!.offset + Math.floor(lastBatch[0]!.length / 2));

    const reopened = saverOn(dir);
    const tuple = await reopened.getTuple(config("t", parent!.id));
    expect(tuple?.checkpoint.channel_values).toEqual(parent!.values);
    const seenTasks = [...new Set((tuple?.pendingWrites ?? []).map(([task]) => task))].sort();
    // Nothing of the torn batch (its first line is the one damaged, so not even a prefix of it).
    expect(seenTasks).toEqual(committedTasks.sort());
    for (const [task, channel, value] of tuple?.pendingWrites ?? []) {
      if (channel === "out") expect(value).toBe(`result of ${task}`);
    }
    // And the thread goes on: the next write lands after the cut.
    const [child] = await putChain(reopened, "t", 1, { after: parent! });
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.channel_values).toEqual(child!.values);
  });

  it("damage to a committed record followed by later batches is CHECKPOINT_CORRUPT naming the file and byte, and nothing is served", async () => {
    const dir = await tempStore();
    const puts = await putChain(saverOn(dir), "t", 4);
    const file = journalOf(dir, "t");
    const target = (await journalLines(file)).find((l) => l.record.id === puts[1]!.id)!;
    await damageByte(file, target.offset + Math.floor(target.length / 2));

    const reopened = saverOn(dir);
    for (const read of [
      () => reopened.getTuple(config("t")),
      () => reopened.getTuple(config("t", puts[3]!.id)),
      () => reopened.getTuple(config("t", puts[0]!.id)),
      () => idsOf(reopened, "t"),
    ]) {
      const error = await rejection(read());
      expectCode(error, "CHECKPOINT_CORRUPT");
      expect(error.message).toContain(file);
      expect(error.message).toContain(`byte ${target.offset}`);
      expect(error.details).toMatchObject({ file, offset: target.offset });
    }
    // Nor does it write past the damage as if it were a torn tail: the file is left as it was found.
    const size = (await stat(file)).size;
    expectCode(await rejection(putChain(reopened, "t", 1, { after: puts[3]! })), "CHECKPOINT_CORRUPT");
    expect((await stat(file)).size).toBe(size);
  });
});

// -------------------------------------------------------------------------------------------------
// Several savers on one store

describe("FileCheckpointSaver: several savers (processes) on one store", () => {
  it("never keeps a stale 'no such thread': it reads and extends a thread another saver created", async () => {
    const dir = await tempStore();
    const a = saverOn(dir);
    expect(await latestOf(a, "t")).toBeUndefined();

    const b = saverOn(dir);
    const puts = await putChain(b, "t", 3, { label: "B" });
    await b.close();

    const seen = await latestOf(a, "t");
    expect(seen?.checkpoint.id).toBe(puts[2]!.id);
    expect(seen?.checkpoint.channel_values).toEqual(puts[2]!.values);

    const [child] = await putChain(a, "t", 1, { after: puts[2]!, label: "A" });
    await a.close();
    const fresh = saverOn(dir);
    expect(await idsOf(fresh, "t")).toEqual([...puts.map((p) => p.id), child!.id].sort());
    expect((await latestOf(fresh, "t"))?.checkpoint.channel_values).toEqual(child!.values);
  });

  it("two writers at once: the second is refused with THREAD_LOCKED naming the holder, and no reader is served wrong values", async () => {
    const dir = await tempStore();
    const a = saverOn(dir);
    const b = saverOn(dir);
    const [a1] = await putChain(a, "t", 1, { label: "A" });
    const b1 = makeCheckpoint({ n: 1, text: "B #1 on t" }, { n: 2, text: 2 });
    const refused = await b.put(config("t", a1!.id), b1, metadataAt(0), { n: 2, text: 2 }).then(
      () => undefined,
      (error: unknown) => error,
    );
    expectCode(refused, "THREAD_LOCKED");
    expect((refused as Error).message).toContain("another store object in this process");
    expect((refused as Error).message).toContain(join(dir, "threads", "t", "writer.lock"));
    // A keeps writing; B still reads everything correctly.
    const [a2] = await putChain(a, "t", 1, { after: a1!, label: "A again" });
    for (const saver of [a, b, saverOn(dir)]) {
      expect((await latestOf(saver, "t"))?.checkpoint.channel_values).toEqual(a2!.values);
      expect(await idsOf(saver, "t")).toEqual([a1!.id, a2!.id].sort());
    }
    // Once A is closed, B may write.
    await a.close();
    const [b2] = await putChain(b, "t", 1, { after: a2!, label: "B after A" });
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.channel_values).toEqual(b2!.values);
  });

  it("a writer lock left by a killed process, or a garbled one, is taken over", async () => {
    const dir = await tempStore();
    const first = saverOn(dir);
    const [p1] = await putChain(first, "t", 1);
    await crash(first, dir, "t");
    const [p2] = await putChain(saverOn(dir), "t", 1, { after: p1! });
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.id).toBe(p2!.id);

    const dir2 = await tempStore();
    const second = saverOn(dir2);
    const [q1] = await putChain(second, "t", 1);
    await second.close();
    await writeFile(join(dir2, "threads", "t", "writer.lock"), "{ not json");
    const [q2] = await putChain(saverOn(dir2), "t", 1, { after: q1! });
    expect((await latestOf(saverOn(dir2), "t"))?.checkpoint.id).toBe(q2!.id);
  });

  it("two writers racing: when every put reports success, every one of them is in the journal", async () => {
    // Two runs of one thread started by mistake, writing at nearly the same moment. Refusing a put is
    // fine (one writer at a time is the rule); acknowledging a put and then losing it, with no error
    // anywhere, is not. Step files are off so that only the journal is raced.
    const { silentLosses } = await raceTwoWriters({ rounds: 60, stepFiles: false });
    expect(silentLosses, `${silentLosses.length} of 60 rounds lost an acknowledged checkpoint without any error`).toEqual([]);
  });

  it("two writers racing with step files: a refused put is THREAD_LOCKED, never a raw file-system error", async () => {
    const { otherErrors } = await raceTwoWriters({ rounds: 60, stepFiles: true });
    expect(otherErrors, "puts that failed with something other than THREAD_LOCKED").toEqual([]);
  });
});

/**
 * Savers A and B on one fresh store per round; both have read the thread (as a second `cairn resume`
 * would), then put A, B, A, B children of its root at nearly the same moment. The race is timing-
 * dependent, so it runs over several rounds, with delays that differ per round. Any value a fresh
 * reader serves must be the one put under that id; a read may instead fail with CHECKPOINT_CORRUPT.
 */
async function raceTwoWriters(options: { rounds: number; stepFiles: boolean }) {
  const silentLosses: string[] = [];
  const otherErrors: string[] = [];
  let version = 1;
  for (let round = 0; round < options.rounds; round += 1) {
    const dir = await tempStore();
    const a = saverOn(dir, { stepFiles: options.stepFiles });
    const b = saverOn(dir, { stepFiles: options.stepFiles });
    const expected = new Map<string, Record<string, unknown>>();
    const acknowledged: string[] = [];
    const errors: unknown[] = [];
    const root = makeCheckpoint({ x: "root" }, { x: ++version });
    await a.put(config("t"), root, metadataAt(-1), root.channel_versions);
    expected.set(root.id, root.channel_values);
    acknowledged.push(root.id);
    expect(await latestOf(b, "t")).toBeDefined();

    await Promise.all(
      (["A", "B", "A", "B"] as const).map(async (who, i) => {
        const checkpoint = makeCheckpoint({ x: `${who}${i} of round ${round}` }, { x: ++version });
        expected.set(checkpoint.id, checkpoint.channel_values);
        await new Promise((done) => setTimeout(done, (round * 7 + i * 3) % 4));
        try {
          await (who === "A" ? a : b).put(config("t", root.id), checkpoint, metadataAt(0), checkpoint.channel_versions);
          acknowledged.push(checkpoint.id);
        } catch (error) {
          errors.push(error);
          if (!isCairnError(error, "THREAD_LOCKED")) otherErrors.push(`round ${round}: ${String(error)}`);
        }
      }),
    );
    await a.close();
    await b.close();

    const listed = new Map<string, CheckpointTuple>();
    try {
      for (const tuple of await listAll(saverOn(dir), "t")) listed.set(tuple.checkpoint.id, tuple);
    } catch (error) {
      expectCode(error, "CHECKPOINT_CORRUPT");
      continue;
    }
    for (const tuple of listed.values()) expect(tuple.checkpoint.channel_values).toEqual(expected.get(tuple.checkpoint.id));
    const missing = acknowledged.filter((id) => !listed.has(id));
    if (errors.length === 0 && missing.length > 0) {
      silentLosses.push(`round ${round}: ${missing.map((id) => JSON.stringify(expected.get(id))).join(", ")} acknowledged, then missing`);
    }
  }
  return { silentLosses, otherErrors };
}

// -------------------------------------------------------------------------------------------------
// Compactness

describe("FileCheckpointSaver: unchanged channels are not written again", () => {
  it("20 steps that keep a 200 KB channel unchanged add far less than 20 copies of it", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    const big = Array.from({ length: 200 * 1024 / 32 }, (_, i) => `chunk ${String(i).padStart(8, "0")} of big;`.padEnd(32, ".")).join("");
    expect(big.length).toBe(200 * 1024);

    const root = makeCheckpoint({ big, small: 0 }, { big: 1, small: 1 });
    await saver.put(config("t"), root, metadataAt(-1), { big: 1, small: 1 });
    const sizeAfterRoot = (await stat(journalOf(dir, "t"))).size;
    let parent = root.id;
    for (let i = 1; i <= 20; i += 1) {
      // As LangGraph passes it: the full state, with only the changed channel in newVersions.
      const child = makeCheckpoint({ big, small: i }, { big: 1, small: i + 1 });
      await saver.put(config("t", parent), child, metadataAt(i - 1), { small: i + 1 });
      parent = child.id;
    }

    const size = (await stat(journalOf(dir, "t"))).size;
    expect(size).toBeLessThan(400 * 1024);
    expect(size - sizeAfterRoot).toBeLessThan(100 * 1024);
    for (const reader of [saver, saverOn(dir)]) {
      const last = await latestOf(reader, "t");
      expect(last?.checkpoint.id).toBe(parent);
      expect(last?.checkpoint.channel_values.small).toBe(20);
      expect(last?.checkpoint.channel_values.big === big, "big comes back intact").toBe(true);
      expect(last?.checkpoint.channel_versions).toEqual({ big: 1, small: 21 });
    }
  });
});

// -------------------------------------------------------------------------------------------------
// Format versions

describe("FileCheckpointSaver: the store marker and journal header carry a format version", () => {
  it("an empty marker (a crash before its data reached disk) is rewritten, and the store works as usual", async () => {
    const dir = await tempStore();
    const marker = join(dir, "cairn-store.json");
    await writeFile(marker, "");

    const saver = saverOn(dir);
    expect(await latestOf(saver, "t")).toBeUndefined();
    expect(await saver.listThreadIds()).toEqual([]);
    const puts = await putChain(saver, "t", 2);
    expect((await latestOf(saver, "t"))?.checkpoint.channel_values).toEqual(puts[1]!.values);
    expect(JSON.parse(await readFile(marker, "utf8"))).toMatchObject({ version: FILE_STORE_FORMAT_VERSION });
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.channel_values).toEqual(puts[1]!.values);
  });

  it("an empty marker beside existing threads: they read and extend normally, and the marker is rewritten", async () => {
    const dir = await tempStore();
    const first = saverOn(dir);
    const puts = await putChain(first, "t", 2);
    await crash(first, dir, "t");
    const marker = join(dir, "cairn-store.json");
    await writeFile(marker, "");

    const saver = saverOn(dir);
    expect((await latestOf(saver, "t"))?.checkpoint.channel_values).toEqual(puts[1]!.values);
    const [next] = await putChain(saver, "t", 1, { after: puts[1]! });
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.channel_values).toEqual(next!.values);
    expect(await readFile(marker, "utf8"), "the marker is rewritten once the store is written to").not.toBe("");
    expect(JSON.parse(await readFile(marker, "utf8"))).toMatchObject({ version: FILE_STORE_FORMAT_VERSION });
  });

  it("a marker from a newer cairn: reads and writes fail with CHECKPOINT_CORRUPT saying a newer cairn wrote it", async () => {
    const dir = await tempStore();
    const puts = await putChain(saverOn(dir), "t", 1);
    const marker = join(dir, "cairn-store.json");
    await writeFile(marker, JSON.stringify({ format: "cairn-file-store", version: 99 }) + "\n");

    const saver = saverOn(dir);
    for (const attempt of [
      () => latestOf(saver, "t"),
      () => idsOf(saver, "t"),
      () => putChain(saver, "t", 1, { after: puts[0]! }),
      () => putChain(saver, "another", 1),
    ]) {
      const error = await rejection(attempt());
      expectCode(error, "CHECKPOINT_CORRUPT");
      expect(error.message).toMatch(/newer cairn/);
      expect(error.message).toContain(marker);
      expect(error.message).toContain("99");
    }
    expect(await exists(join(dir, "threads", "another"))).toBe(false);
  });

  it("a journal header from a newer cairn: reading that thread fails with CHECKPOINT_CORRUPT saying a newer cairn wrote it", async () => {
    const dir = await tempStore();
    await putChain(saverOn(dir), "t", 2);
    const file = journalOf(dir, "t");
    const bytes = await readFile(file);
    const headerEnd = bytes.indexOf(0x0a) + 1;
    const header = (await journalLines(file))[0]!.record;
    expect(header).toMatchObject({ k: "hdr", v: FILE_STORE_FORMAT_VERSION });
    await writeFile(file, Buffer.concat([Buffer.from(journalLine(JSON.stringify({ ...header, v: 99 }), 0)), bytes.subarray(headerEnd)]));

    const saver = saverOn(dir);
    for (const attempt of [() => latestOf(saver, "t"), () => idsOf(saver, "t")]) {
      const error = await rejection(attempt());
      expectCode(error, "CHECKPOINT_CORRUPT");
      expect(error.message).toMatch(/newer cairn/);
      expect(error.message).toContain(file);
    }
  });
});

// -------------------------------------------------------------------------------------------------
// Folders and readable files

const TwoSteps = z.object({ topic: z.string(), outline: z.string().optional(), draft: z.string().optional() });
const twoSteps = () =>
  workflow("two-steps", { state: TwoSteps, defaultInput: { topic: "tides" } })
    .step("make_outline", async (s) => ({ outline: `outline of ${s.topic}` }))
    .step("write_draft", async (s) => ({ draft: `draft from ${s.outline}` }));

describe("FileCheckpointSaver: thread folders and readable step files", () => {
  it("writes one readable JSON file per step, holding what the step returned", async () => {
    const dir = await tempStore();
    await run(twoSteps(), { thread: "story", store: `file:${dir}` });

    const folder = join(dir, "threads", "story");
    const names = await readdir(folder);
    const outlineFile = names.find((n) => /^\d{4}-make_outline\.json$/.test(n));
    const draftFile = names.find((n) => /^\d{4}-write_draft\.json$/.test(n));
    expect(outlineFile, `step files in ${names.join(", ")}`).toBeDefined();
    expect(draftFile).toBeDefined();
    expect(outlineFile! < draftFile!, "files sort in the order the steps ran").toBe(true);

    const outline = JSON.parse(await readFile(join(folder, outlineFile!), "utf8")) as Record<string, unknown>;
    const draft = JSON.parse(await readFile(join(folder, draftFile!), "utf8")) as Record<string, unknown>;
    expect(outline).toMatchObject({ step: "make_outline", produced: { outline: "outline of tides" } });
    expect(draft).toMatchObject({ step: "write_draft", produced: { draft: "draft from outline of tides" } });
    // The file names a checkpoint the store really holds, with the values the step produced.
    const saver = saverOn(dir);
    const at = await saver.getTuple(config("story", String(draft.checkpoint)));
    expect(at?.checkpoint.channel_values).toMatchObject({ draft: "draft from outline of tides" });
  });

  it("any thread id maps to one safe folder directly under threads/, and reads back under the same id", async () => {
    const root = await tempStore();
    const dir = join(root, "store");
    const ids = ["../../escape", "a/b", "..", ".", ".hidden", "with space", "été ☃ 物語", "a%2Fb", "%2E%2E"];
    const saver = saverOn(dir);
    const byId = new Map<string, Put>();
    for (const id of ids) byId.set(id, (await putChain(saver, id, 1, { label: id }))[0]!);
    await run(twoSteps(), { thread: "x/../../y z", store: `file:${dir}` });

    expect(await readdir(root), "nothing escaped the store directory").toEqual(["store"]);
    const threadsDir = join(dir, "threads");
    const folders = await readdir(threadsDir);
    expect(folders.length, `folders: ${folders.join(" | ")}`).toBe(ids.length + 1);
    for (const name of folders) {
      expect(name).not.toMatch(/[/\\]/);
      expect(name.startsWith(".")).toBe(false);
      expect(dirname(resolve(threadsDir, name))).toBe(resolve(threadsDir));
      expect((await stat(join(threadsDir, name, "journal.log"))).isFile()).toBe(true);
    }
    expect(await saver.listThreadIds()).toEqual([...ids, "x/../../y z"].sort());
    const fresh = saverOn(dir);
    for (const [id, put] of byId) expect((await latestOf(fresh, id))?.checkpoint.channel_values, id).toEqual(put.values);
    expect((await latestOf(fresh, "x/../../y z"))?.checkpoint.channel_values).toMatchObject({ draft: "draft from outline of tides" });
  });

  it("a thread id too long for a folder name is INVALID_ARGUMENT before anything is written", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    const thread = "é".repeat(100);
    const checkpoint = makeCheckpoint({ n: 0 }, { n: 1 });
    for (const attempt of [
      () => saver.put(config(thread), checkpoint, metadataAt(-1), { n: 1 }),
      () => saver.putWrites(config(thread, checkpoint.id), [["n", 1]], "task"),
      () => run(twoSteps(), { thread, store: `file:${dir}` }),
    ]) {
      const error = await rejection(attempt());
      expectCode(error, "INVALID_ARGUMENT");
      expect(error.message).toMatch(/too long/);
    }
    const threads = await readdir(join(dir, "threads")).catch(() => []);
    expect(threads).toEqual([]);
  });
});

// -------------------------------------------------------------------------------------------------
// Deleting and history

describe("FileCheckpointSaver: deleteThread", () => {
  it("removes the thread and its folder, and leaves the other threads intact", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    await putChain(saver, "doomed", 3);
    const kept = await putChain(saver, "kept", 3);

    await saver.deleteThread("doomed");
    expect(await latestOf(saver, "doomed")).toBeUndefined();
    expect(await exists(join(dir, "threads", "doomed"))).toBe(false);
    expect(await readdir(join(dir, "threads"))).toEqual(["kept"]);
    expect(await saver.listThreadIds()).toEqual(["kept"]);

    const fresh = saverOn(dir);
    expect(await latestOf(fresh, "doomed")).toBeUndefined();
    expect(await idsOf(fresh, "kept")).toEqual(kept.map((p) => p.id).sort());
    expect((await latestOf(fresh, "kept"))?.checkpoint.channel_values).toEqual(kept[2]!.values);
    // The saver that deleted it can start the thread afresh.
    const [again] = await putChain(saver, "doomed", 1, { label: "again" });
    expect(await idsOf(saverOn(dir), "doomed")).toEqual([again!.id]);
  });

  it("deletes a thread whose id is as long as the store accepts", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    // 26 CJK characters: 234 bytes as a folder name, under the store's 240-byte limit.
    for (const thread of ["物".repeat(26), "a".repeat(240)]) {
      await putChain(saver, thread, 1);
      await saver.deleteThread(thread);
      expect(await latestOf(saverOn(dir), thread), `thread of ${thread.length} characters`).toBeUndefined();
    }
    expect(await readdir(join(dir, "threads"))).toEqual([]);
  });
});

describe("FileCheckpointSaver: history is never edited", () => {
  it("restarting a step that now returns something else leaves the old checkpoints' values as they were", async () => {
    const dir = await tempStore();
    const store = `file:${dir}`;
    let drafts = 0;
    const wf = workflow("redraft", { state: TwoSteps, defaultInput: { topic: "tides" } })
      .step("make_outline", async (s) => ({ outline: `outline of ${s.topic}` }))
      .step("write_draft", async () => ({ draft: `draft #${++drafts}` }));
    await run(wf, { thread: "t", store });

    const before = saverOn(dir);
    const first = await latestOf(before, "t");
    expect(first?.checkpoint.channel_values).toMatchObject({ draft: "draft #1" });
    await before.close();

    await resume(wf, { thread: "t", store, fromStep: "write_draft" });
    const after = saverOn(dir);
    expect((await latestOf(after, "t"))?.checkpoint.channel_values).toMatchObject({ draft: "draft #2" });
    expect((await readHistory(after, "t")).map((e) => e.id)).toContain(first!.checkpoint.id);
    const old = await after.getTuple(config("t", first!.checkpoint.id));
    expect(old?.checkpoint.channel_values, "the first run's final checkpoint").toEqual(first!.checkpoint.channel_values);
  });

  it("two children of one checkpoint that write the same channel version keep their own values", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    const parent = makeCheckpoint({ x: "parent" }, { x: 1 });
    await saver.put(config("t"), parent, metadataAt(-1), { x: 1 });
    // A fork: both children derive x's next version from the same parent, as getNextVersion does.
    const version = saver.getNextVersion(1);
    const left = makeCheckpoint({ x: "left" }, { x: version });
    const right = makeCheckpoint({ x: "right" }, { x: saver.getNextVersion(1) });
    await saver.put(config("t", parent.id), left, metadataAt(0), { x: left.channel_versions.x! });
    await saver.put(config("t", parent.id), right, metadataAt(0), { x: right.channel_versions.x! });

    for (const reader of [saver, saverOn(dir)]) {
      expect((await reader.getTuple(config("t", left.id)))?.checkpoint.channel_values).toEqual({ x: "left" });
      expect((await reader.getTuple(config("t", right.id)))?.checkpoint.channel_values).toEqual({ x: "right" });
    }
  });
});

// -------------------------------------------------------------------------------------------------
// Clean closes, deletes and lost locks

describe("FileCheckpointSaver: what a clean close, a delete and a lost lock mean", () => {
  it("damage in the last write of a cleanly closed journal is CHECKPOINT_CORRUPT, not a torn tail to drop", async () => {
    const dir = await tempStore();
    const saver = saverOn(dir);
    const [parent] = await putChain(saver, "t", 1);
    await Promise.all(["a", "b", "c"].map((task) => saver.putWrites(config("t", parent!.id), [["out", task]], task)));
    await saver.close();
    const file = journalOf(dir, "t");
    const lines = await journalLines(file);
    expect(lines.at(-1)?.record.k).toBe("end");
    const lastWrite = lines.filter((l) => l.record.k === "w").at(-1)!;
    await damageByte(file, lastWrite.offset + Math.floor(lastWrite.length / 2));
    expectCode(await rejection(saverOn(dir).getTuple(config("t", parent!.id))), "CHECKPOINT_CORRUPT");
    // Nothing was cut: the damaged bytes are still there for inspection.
    expect((await readFile(file)).length).toBe(lines.at(-1)!.offset + lines.at(-1)!.length);
  });

  it("a thread another saver is writing cannot be deleted from under it", async () => {
    const dir = await tempStore();
    const writer = saverOn(dir);
    await putChain(writer, "t", 1);
    expectCode(await rejection(saverOn(dir).deleteThread("t")), "THREAD_LOCKED");
    expect(await latestOf(saverOn(dir), "t")).toBeDefined();
    await writer.close();
    await saverOn(dir).deleteThread("t");
    expect(await latestOf(saverOn(dir), "t")).toBeUndefined();
  });

  it("a reader sees a thread that was deleted and made again as the new thread, never the old one", async () => {
    const dir = await tempStore();
    const reader = saverOn(dir);
    const first = saverOn(dir);
    const [old] = await putChain(first, "t", 1, { label: "old" });
    expect((await latestOf(reader, "t"))?.checkpoint.id).toBe(old!.id);
    await first.deleteThread("t");
    await first.close();
    expect(await latestOf(reader, "t")).toBeUndefined();
    const [fresh] = await putChain(saverOn(dir), "t", 3, { label: "new" });
    expect((await latestOf(reader, "t"))?.checkpoint.channel_values).toEqual((await latestOf(saverOn(dir), "t"))?.checkpoint.channel_values);
    expect(await idsOf(reader, "t")).not.toContain(old!.id);
    expect(fresh).toBeDefined();
  });

  it("a writer whose lock was removed and taken by another stops writing with THREAD_LOCKED", async () => {
    const dir = await tempStore();
    const a = saverOn(dir);
    const [p1] = await putChain(a, "t", 1);
    await rm(join(dir, "threads", "t", "writer.lock"));
    const b = saverOn(dir);
    const [p2] = await putChain(b, "t", 1, { after: p1! });
    const error = await rejection(putChain(a, "t", 1, { after: p1!, label: "A after losing its lock" }));
    expectCode(error, "THREAD_LOCKED");
    expect(error.message).toContain("no longer holds the writer lock");
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.id).toBe(p2!.id);
  });

  it("close() during a first write leaves no lock behind", async () => {
    const dir = await tempStore();
    const a = saverOn(dir);
    const putting = putChain(a, "t", 1);
    await a.close();
    await putting.catch(() => {});
    await a.close();
    const [after] = await putChain(saverOn(dir), "t", 1, { label: "another saver" });
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.id).toBe(after!.id);
  });

  it("a journal whose creation was cut short (no complete header) is no thread, and the thread can be made again", async () => {
    const dir = await tempStore();
    await mkdir(join(dir, "threads", "t"), { recursive: true });
    await writeFile(journalOf(dir, "t"), "0123abcd 00000000 {\"k\":\"hd");
    expect(await latestOf(saverOn(dir), "t")).toBeUndefined();
    const [p] = await putChain(saverOn(dir), "t", 1);
    expect((await latestOf(saverOn(dir), "t"))?.checkpoint.id).toBe(p!.id);
  });

  it("a serializer that pretty-prints JSON still yields one record per line", async () => {
    const dir = await tempStore();
    const base = new FileCheckpointSaver({ dir }).serde;
    const pretty = {
      dumpsTyped: async (value: unknown) => {
        const [type, data] = await base.dumpsTyped(value);
        if (type !== "json") return [type, data] as [string, Uint8Array];
        const text = typeof data === "string" ? data : new TextDecoder().decode(data);
        return [type, new TextEncoder().encode(JSON.stringify(JSON.parse(text), null, 2))] as [string, Uint8Array];
      },
      loadsTyped: (type: string, data: Uint8Array | string) => base.loadsTyped(type, data),
    };
    const [p] = await putChain(saverOn(dir, { serde: pretty }), "t", 2);
    expect(p).toBeDefined();
    const reopened = saverOn(dir, { serde: pretty });
    expect(await idsOf(reopened, "t")).toHaveLength(2);
  });
});

describe("the generation fence: a paused holder's late write", () => {
  it("a record of an older writer generation that lands after another writer took the thread over is never read", async () => {
    const dir = await tempStore();
    const a = saverOn(dir);
    const [first, late] = await putChain(a, "t", 2, { label: "A" });
    await a.close();
    // A's second record stands for the write a paused holder had not made yet: taken out of the journal
    // now, appended again once another writer has taken the thread over.
    const file = journalOf(dir, "t");
    const bytes = await readFile(file);
    const line = (await journalLines(file)).find((l) => l.record.k === "cp" && l.record.id === late!.id)!;
    const lateBytes = Buffer.from(bytes.subarray(line.offset, line.offset + line.length));
    await writeFile(file, Buffer.concat([bytes.subarray(0, line.offset), bytes.subarray(line.offset + line.length)]));

    const b = saverOn(dir);
    const [second] = await putChain(b, "t", 1, { after: first, label: "B" });
    await appendFile(file, lateBytes);

    const reader = saverOn(dir);
    expect((await latestOf(reader, "t"))!.checkpoint.id).toBe(second!.id);
    expect(await idsOf(reader, "t")).toEqual([first!.id, second!.id].sort());
    expect(await reader.getTuple(config("t", late!.id))).toBeUndefined();

    // The new holder writes on past it, and a fresh reader sees only its history.
    const [third] = await putChain(b, "t", 1, { after: second, label: "B" });
    const again = saverOn(dir);
    expect((await latestOf(again, "t"))!.checkpoint.channel_values).toEqual(third!.values);
    expect(await idsOf(again, "t")).toEqual([first!.id, second!.id, third!.id].sort());
  });
});
