/**
 * The file store's compaction (what `deleteCheckpoints`, `prune` and retention do to a thread's journal),
 * checked on real directories: values only dropped records held are carried over, other savers (standing
 * for other processes) see the new journal, a thread another writer holds is refused, damage to a
 * compacted journal is still reported, writes arriving meanwhile land in the new journal, and a crash at
 * any moment, including a SIGKILL of a process in the middle of compacting, leaves the old journal or
 * the new one, never a mix.
 */
import { spawn } from "node:child_process";
import { cp, mkdtemp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, describe, expect, it } from "vitest";
import { z } from "zod";
import { appendList, FileCheckpointSaver, openStore, readHistory, resume, run, workflow, type OpenedStore } from "cairn";
import { seededRandom } from "../graphs/lib/random.ts";
import { ROOT } from "./helpers/cli.ts";
import { expectCode, rejection } from "./helpers/errors.ts";

const cleanups: (() => Promise<unknown>)[] = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup().catch(() => {});
});

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-compaction-"));
  cleanups.push(() => rm(dir, { recursive: true, force: true }));
  return dir;
}

async function storeOn(dir: string): Promise<OpenedStore> {
  const store = await openStore(`file:${dir}`);
  cleanups.push(() => store.close());
  return store;
}

const journalOf = (dir: string, thread: string) => join(dir, "threads", thread, "journal.log");
const latest = (saver: OpenedStore["saver"], thread: string) => saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "" } });

/**
 * A corpus written once by the first step (never changed again), then `rounds` loop steps that each
 * replace a `lineKb` KB field and add a short line: after a compaction that drops the first records, the
 * newest checkpoint still reads the corpus, which only the first step's records held.
 */
const CORPUS_MARKER = "CORPUS-MARKER";
const S = z.object({
  rounds: z.number().default(12),
  lineKb: z.number().default(1),
  corpus: z.string().optional(),
  n: z.number().default(0),
  last: z.string().optional(),
  lines: appendList(z.string()),
});
const growing = workflow("growing", { state: S })
  .step("setup", async () => ({ corpus: `${CORPUS_MARKER} ${"corpus ".repeat(20_000)}` }))
  .step("tick", async (s) => ({ n: s.n + 1, last: String(s.n + 1).repeat(s.lineKb * 1024), lines: [`line ${s.n + 1}`] }))
  .route("tick", (s) => (s.n < s.rounds ? "tick" : "end"));

async function grown(dir: string, thread: string, input: Partial<z.input<typeof S>> = {}): Promise<void> {
  const store = await openStore(`file:${dir}`);
  try {
    await run(growing, { store, thread, input });
  } finally {
    await store.close();
  }
}

const occurrences = (text: string, needle: string) => text.split(needle).length - 1;

describe("file store compaction", () => {
  it("carries over the values the kept checkpoints read from dropped records, once, and frees the rest", async () => {
    const dir = await tempDir();
    await grown(dir, "t");
    const store = await storeOn(dir);
    const before = await latest(store.saver, "t");
    const history = await readHistory(store.saver, "t");
    const journalBefore = (await stat(journalOf(dir, "t"))).size;
    // Twice: in the setup task's saved output, and as a value of the checkpoint that folded it in.
    expect(occurrences(await readFile(journalOf(dir, "t"), "utf8"), CORPUS_MARKER)).toBe(2);

    const { deleted, bytesFreed } = await store.deleteCheckpoints(
      "t",
      history.map((e) => e.id),
    );
    expect(deleted).toHaveLength(history.length - 1);
    const journal = await readFile(journalOf(dir, "t"), "utf8");
    expect(Buffer.byteLength(journal)).toBeLessThan(journalBefore);
    expect(bytesFreed).toBeGreaterThanOrEqual(journalBefore - Buffer.byteLength(journal));
    // The corpus lived in the first step's record, which is gone: the newest record carries it now, once.
    expect(occurrences(journal, CORPUS_MARKER)).toBe(1);
    expect((await latest(store.saver, "t"))!.checkpoint).toEqual(before!.checkpoint);

    // A new saver (another process) reads the same.
    const fresh = new FileCheckpointSaver({ dir });
    cleanups.push(() => fresh.close());
    expect((await latest(fresh, "t"))!.checkpoint).toEqual(before!.checkpoint);
    expect((await readHistory(fresh, "t")).map((e) => e.id)).toEqual([history.at(-1)!.id]);
  });

  it("other savers that read the thread before see the new journal", async () => {
    const dir = await tempDir();
    await grown(dir, "t");
    const writer = await storeOn(dir);
    const reader = new FileCheckpointSaver({ dir });
    cleanups.push(() => reader.close());
    const history = await readHistory(reader, "t");
    const before = await latest(reader, "t");

    await writer.deleteCheckpoints(
      "t",
      history.slice(0, -3).map((e) => e.id),
    );
    expect((await readHistory(reader, "t")).map((e) => e.id)).toEqual(history.slice(-3).map((e) => e.id));
    expect((await latest(reader, "t"))!.checkpoint).toEqual(before!.checkpoint);
    const oldest = history.at(-3)!;
    const tuple = await reader.getTuple({ configurable: { thread_id: "t", checkpoint_ns: "", checkpoint_id: oldest.id } });
    expect(tuple!.parentConfig?.configurable?.checkpoint_id).toBe(oldest.parent);
  });

  it("refuses a thread another writer holds, and changes nothing", async () => {
    const dir = await tempDir();
    const holder = await storeOn(dir);
    // A run gives the lock up when it ends; the holder takes it again, as a notebook or a retention pass would.
    await run(growing, { store: holder, thread: "t", input: { rounds: 3 } });
    await holder.lockThread("t");
    const other = await storeOn(dir);
    const history = await readHistory(other.saver, "t");
    const bytes = await readFile(journalOf(dir, "t"));
    const error = await rejection(other.deleteCheckpoints("t", [history[0]!.id]));
    expectCode(error, "THREAD_LOCKED");
    expect(error.message).toContain("another store object in this process");
    expect(await readFile(journalOf(dir, "t"))).toEqual(bytes);
    // The dry run says the same without taking anything.
    expectCode(await rejection(other.deleteCheckpoints("t", [history[0]!.id], { dryRun: true })), "THREAD_LOCKED");
    // The holder itself compacts (this is what retention does during a run).
    expect((await holder.deleteCheckpoints("t", [history[0]!.id])).deleted).toEqual([history[0]!.id]);
  });

  it("reports damage inside a compacted journal instead of taking it for a torn tail", async () => {
    const dir = await tempDir();
    await grown(dir, "t", { rounds: 6 });
    const store = await storeOn(dir);
    const history = await readHistory(store.saver, "t");
    await store.deleteCheckpoints(
      "t",
      history.slice(0, -3).map((e) => e.id),
    );
    await store.close();
    const file = journalOf(dir, "t");
    const lines = (await readFile(file, "utf8")).split("\n");
    // Damage the first kept checkpoint's line: the lines after it were committed with it.
    const at = lines.findIndex((l) => l.includes('"k":"cp"'));
    lines[at] = lines[at]!.replace(/"n":(\d+)/, (_, n: string) => `"n":${Number(n) + 1}`);
    await writeFile(file, lines.join("\n"));
    const fresh = new FileCheckpointSaver({ dir });
    cleanups.push(() => fresh.close());
    const error = await rejection(latest(fresh, "t"));
    expectCode(error, "CHECKPOINT_CORRUPT");
    expect(error.message).toContain(file);
  });

  it("removes the step files of removed checkpoints; the numbering goes on", async () => {
    const dir = await tempDir();
    await grown(dir, "t", { rounds: 5 });
    const store = await storeOn(dir);
    const history = await readHistory(store.saver, "t");
    const stepFiles = async () => (await readdir(join(dir, "threads", "t"))).filter((n) => /^\d{4}-/.test(n)).sort();
    const all = await stepFiles();
    expect(all.length).toBe(history.length);
    await store.deleteCheckpoints(
      "t",
      history.slice(0, -2).map((e) => e.id),
    );
    expect(await stepFiles()).toEqual(all.slice(-2));
    await store.close();

    const again = await storeOn(dir);
    await resume(growing, { store: again, thread: "t", fromStep: "tick" });
    const after = await stepFiles();
    expect(after.slice(0, 2)).toEqual(all.slice(-2));
    const numbers = after.map((n) => Number(n.slice(0, 4)));
    expect(numbers).toEqual([...numbers].sort((a, b) => a - b));
    expect(new Set(numbers).size).toBe(numbers.length);
    expect(numbers[2]).toBe(numbers[1]! + 1);
  });

  it("task writes sent while a compaction runs wait for it and land in the new journal", async () => {
    const dir = await tempDir();
    await grown(dir, "t", { rounds: 4 });
    const store = await storeOn(dir);
    const history = await readHistory(store.saver, "t");
    const head = (await latest(store.saver, "t"))!;
    const writes = Array.from({ length: 20 }, (_, i) =>
      store.saver.putWrites(head.config, [[`extra_${i}`, `value ${i}`]], `task-${i}`),
    );
    const compaction = store.deleteCheckpoints(
      "t",
      history.map((e) => e.id),
    );
    const more = Array.from({ length: 20 }, (_, i) => store.saver.putWrites(head.config, [[`late_${i}`, `late ${i}`]], `late-task-${i}`));
    await Promise.all([...writes, compaction, ...more]);
    const expected = [...Array.from({ length: 20 }, (_, i) => `value ${i}`), ...Array.from({ length: 20 }, (_, i) => `late ${i}`)].sort();
    const values = (t: Awaited<ReturnType<typeof latest>>) => t!.pendingWrites!.map(([, , v]) => v as string).sort();
    expect(values(await latest(store.saver, "t"))).toEqual(expected);
    const fresh = new FileCheckpointSaver({ dir });
    cleanups.push(() => fresh.close());
    expect(values(await latest(fresh, "t"))).toEqual(expected);
    expect(await readHistory(fresh, "t")).toHaveLength(1);
  });

  it("a compaction a crash cut short leaves the old journal; its unfinished file is never read and the next writer removes it", async () => {
    const dir = await tempDir();
    await grown(dir, "t", { rounds: 6 });
    // The journal a finished compaction writes, made in a copy of the store.
    const copy = await tempDir();
    await cp(dir, copy, { recursive: true });
    const copied = await storeOn(copy);
    const ids = (await readHistory(copied.saver, "t")).map((e) => e.id);
    await copied.deleteCheckpoints("t", ids);
    const compacted = await readFile(journalOf(copy, "t"));

    // In the original: one compaction stopped halfway through writing, one stopped before its rename.
    const folder = join(dir, "threads", "t");
    await writeFile(join(folder, "journal.log.compact-crashed-1"), compacted.subarray(0, Math.floor(compacted.length / 2)));
    await writeFile(join(folder, "journal.log.compact-crashed-2"), compacted);
    const store = await storeOn(dir);
    const history = await readHistory(store.saver, "t");
    expect(history.map((e) => e.id)).toEqual(ids);
    const before = (await latest(store.saver, "t"))!;

    // A writer (here a restart) clears them away, and the thread goes on as usual.
    const again = await resume(growing, { store, thread: "t", fromStep: "tick" });
    expect(again.state.lines).toHaveLength(6);
    expect(again.state.corpus).toBe(before.checkpoint.channel_values.corpus);
    expect((await readdir(folder)).filter((n) => n.includes(".compact-"))).toEqual([]);
  });

  it("SIGKILL at any moment of a compaction leaves the old journal or the new one, never a mix", async () => {
    const base = await tempDir();
    // 42 checkpoints of 48 KB values: keeping the 20 newest rewrites about 1 MB.
    await grown(base, "t", { rounds: 40, lineKb: 48 });
    const reference = await storeOn(base);
    const all = (await readHistory(reference.saver, "t")).map((e) => e.id);
    const head = (await latest(reference.saver, "t"))!;
    await reference.close();
    const random = seededRandom(Number(process.env.COMPACTION_CRASH_SEED ?? 11));
    const outcomes: string[] = [];
    // Kill points spread over the compaction (which takes some tens of milliseconds here); the outcomes
    // are printed, and every one must be a whole journal.
    for (let i = 0; i < 4; i += 1) {
      const dir = await tempDir();
      await cp(base, dir, { recursive: true });
      const delayMs = Math.floor(i * 30 + random() * 30);
      const killed = await compactAndKill(dir, "t", 20, delayMs);
      const unfinished = (await readdir(join(dir, "threads", "t"))).some((n) => n.includes(".compact-"));
      const store = await storeOn(dir);
      const ids = (await readHistory(store.saver, "t")).map((e) => e.id);
      // Either every checkpoint (the old journal) or exactly the 20 newest (the new one).
      expect([all.join(","), all.slice(-20).join(",")]).toContain(ids.join(","));
      const now = (await latest(store.saver, "t"))!;
      expect(now.checkpoint).toEqual(head.checkpoint);
      outcomes.push(
        `${delayMs}ms: ${killed ? "killed" : "finished"}, ${ids.length === all.length ? "old" : "new"} journal${unfinished ? ", unfinished compaction left" : ""}`,
      );
      // A writer opening the thread removes any unfinished compaction and can go on.
      await store.saver.putWrites(now.config, [["probe", i]], `probe-${i}`);
      expect((await readdir(join(dir, "threads", "t"))).filter((n) => n.includes(".compact-"))).toEqual([]);
      await store.close();
    }
    console.log(`compaction kills: ${outcomes.join("; ")}`);
  }, 120_000);
});

/** Run the compaction in a child process and SIGKILL it `delayMs` after it starts compacting. */
function compactAndKill(dir: string, thread: string, keep: number, delayMs: number): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, ["--import", "tsx", join(ROOT, "test", "fixtures", "compact-thread.ts"), dir, thread, String(keep)], {
      cwd: ROOT,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    let killed = false;
    child.stderr.on("data", (d) => (err += d));
    child.stdout.on("data", (d) => {
      out += d;
      if (out.includes("compacting") && !killed) {
        killed = true;
        setTimeout(() => child.kill("SIGKILL"), delayMs);
      }
    });
    child.on("close", (code, signal) => {
      if (signal === "SIGKILL") resolve(true);
      else if (code === 0) resolve(false);
      else reject(new Error(`compaction child failed (${code}): ${err}`));
    });
  });
}
