import { spawn } from "node:child_process";
import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { afterAll, describe, expect, it } from "vitest";
import { isCairnError } from "cairn";
import { seededRandom } from "../graphs/lib/random.ts";
import { JsonlSink } from "../src/sinks/jsonl.ts";

/**
 * JsonlSink: idempotent, durable appends to a JSONL dataset. The last test SIGKILLs a real writer process
 * at seeded random moments (JSONL_KILL_SEED replays a schedule) and checks that every item's record ends
 * up in the file exactly once.
 */

const REPO = fileURLToPath(new URL("..", import.meta.url));
const WRITER = join(REPO, "test", "fixtures", "jsonl-writer.mts");
const KILL_SEED = Number(process.env.JSONL_KILL_SEED ?? 0x15e7);

interface Rec {
  i: number;
  body?: string;
}
const byIndex = { key: (r: Rec) => String(r.i) };

const dirs: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "cairn-jsonl-"));
  dirs.push(dir);
  return dir;
}
afterAll(async () => {
  await Promise.all(dirs.map((dir) => rm(dir, { recursive: true, force: true })));
});

function lines(file: string): string[] {
  const text = readFileSync(file, "utf8");
  expect(text === "" || text.endsWith("\n")).toBe(true);
  return text.split("\n").slice(0, -1);
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => expect.fail("expected a rejection"),
    (error: unknown) => error,
  );
}

describe("JsonlSink", () => {
  it("creates the file and its folders, and a reopened sink knows the keys written before", async () => {
    const file = join(await tempDir(), "nested", "deeper", "pairs.jsonl");
    const sink = await JsonlSink.open(file, byIndex);
    expect(sink.path).toBe(file);
    expect(sink.size).toBe(0);
    expect(await sink.append({ i: 0 })).toBe(true);
    expect(await sink.append({ i: 1, body: "line\nbreak \u2028 \u0000" })).toBe(true);
    expect(sink.has("1")).toBe(true);
    await sink.close();
    await sink.close();

    const again = await JsonlSink.open(file, byIndex);
    expect([again.size, again.has("0"), again.has("1"), again.has("2")]).toEqual([2, true, true, false]);
    expect(await again.append({ i: 1, body: "different content, same item" })).toBe(false);
    expect(await again.append({ i: 2 })).toBe(true);
    await again.close();
    expect(lines(file).map((l) => JSON.parse(l) as Rec)).toEqual([{ i: 0 }, { i: 1, body: "line\nbreak \u2028 \u0000" }, { i: 2 }]);
  });

  it("writes a key once: a repeated append, sequential or concurrent, returns false", async () => {
    const file = join(await tempDir(), "d.jsonl");
    const sink = await JsonlSink.open(file, byIndex);
    expect(await Promise.all([sink.append({ i: 7 }), sink.append({ i: 7 }), sink.append({ i: 7 })])).toEqual([true, false, false]);
    expect(await sink.append({ i: 7 })).toBe(false);
    expect(sink.size).toBe(1);
    await sink.close();
    expect(lines(file)).toEqual(['{"i":7}']);
  });

  it("keeps duplicate keys a file already holds, counting them once", async () => {
    const file = join(await tempDir(), "dup.jsonl");
    const text = '{"i":1,"body":"a"}\n\n{"i":1,"body":"b"}\n{"i":2}\n';
    writeFileSync(file, text);
    const sink = await JsonlSink.open(file, byIndex);
    expect(sink.size).toBe(2);
    expect(await sink.append({ i: 1 })).toBe(false);
    await sink.close();
    expect(readFileSync(file, "utf8")).toBe(text);
  });

  it("group-commits 500 concurrent appends: each lands once, in far fewer than 500 write + fdatasync batches", async () => {
    const file = join(await tempDir(), "fan-out.jsonl");
    const sink = await JsonlSink.open(file, byIndex);
    // A fan-out that starts all at once, every item appended twice (a re-run racing the first run).
    const burst = await Promise.all(Array.from({ length: 1000 }, (_, n) => sink.append({ i: n % 500, body: `item ${n % 500}` })));
    expect(burst.filter(Boolean)).toHaveLength(500);
    const burstBatches = sink.batches;

    // Items finishing at scattered moments, 50 at a time: appends arrive while earlier syncs are in flight.
    const random = seededRandom(42);
    const delays = Array.from({ length: 500 }, () => Math.floor(random() * 4));
    let next = 500;
    await Promise.all(
      Array.from({ length: 50 }, async () => {
        while (next < 1000) {
          const i = next++;
          await new Promise((resolve) => setTimeout(resolve, delays[i - 500]));
          expect(await sink.append({ i, body: `item ${i}` })).toBe(true);
        }
      }),
    );
    const scatteredBatches = sink.batches - burstBatches;
    await sink.close();
    console.log(`JsonlSink batches: 500 appends in one burst -> ${burstBatches}; 500 scattered appends, 50 in flight -> ${scatteredBatches}`);

    expect(burstBatches).toBeLessThanOrEqual(2);
    expect(scatteredBatches).toBeLessThan(250);
    const keys = lines(file).map((l) => (JSON.parse(l) as Rec).i);
    expect(keys).toHaveLength(1000);
    expect(new Set(keys).size).toBe(1000);
  });

  it("close waits for queued appends; an append after close is refused", async () => {
    const file = join(await tempDir(), "close.jsonl");
    const sink = await JsonlSink.open(file, byIndex);
    const appends = Array.from({ length: 50 }, (_, i) => sink.append({ i }));
    await sink.close();
    expect(await Promise.all(appends)).toEqual(Array.from({ length: 50 }, () => true));
    const error = await rejection(sink.append({ i: 99 }));
    expect(isCairnError(error, "INVALID_ARGUMENT")).toBe(true);
    expect(lines(file)).toHaveLength(50);
  });

  it("cuts a torn last line on open, keeps its bytes aside, and appends after it make a valid file", async () => {
    const dir = await tempDir();
    const file = join(dir, "torn.jsonl");
    const good = '{"i":0}\n{"i":1}\n';
    writeFileSync(file, `${good}{"i":2,"bo`);
    const sink = await JsonlSink.open(file, byIndex);
    expect(sink.size).toBe(2);
    expect(readFileSync(file, "utf8")).toBe(good);
    expect(readFileSync(join(dir, `torn.jsonl.cut-${good.length}`), "utf8")).toBe('{"i":2,"bo');
    expect(await sink.append({ i: 2, body: "whole" })).toBe(true);
    await sink.close();
    expect(lines(file).map((l) => JSON.parse(l) as Rec)).toEqual([{ i: 0 }, { i: 1 }, { i: 2, body: "whole" }]);

    // A last line that has its newline but is not JSON (the rest of a torn write) is cut too.
    const garbled = join(dir, "garbled.jsonl");
    writeFileSync(garbled, `${good}{"i":2\u0000\u0000\n`);
    const second = await JsonlSink.open(garbled, byIndex);
    await second.close();
    expect(readFileSync(garbled, "utf8")).toBe(good);

    // A line with no newline is cut even if it parses: its record was never acknowledged.
    const unterminated = join(dir, "unterminated.jsonl");
    writeFileSync(unterminated, `${good}12`);
    const third = await JsonlSink.open(unterminated, { key: (r: unknown) => JSON.stringify(r) });
    expect(third.size).toBe(2);
    await third.close();
    expect(readFileSync(unterminated, "utf8")).toBe(good);
  });

  it("reports an unparsable line before the last as CHECKPOINT_CORRUPT, naming file and line, and changes nothing", async () => {
    const dir = await tempDir();
    const file = join(dir, "damaged.jsonl");
    const bytes = Buffer.from('{"i":0}\n{"i":1}\n{"i":2, oops}\n{"i":3}\n{"i":4,"bo');
    writeFileSync(file, bytes);
    const error = await rejection(JsonlSink.open(file, byIndex));
    expect(isCairnError(error, "CHECKPOINT_CORRUPT")).toBe(true);
    const e = error as { message: string; details: Record<string, unknown> };
    expect(e.details).toMatchObject({ file, line: 3 });
    expect(e.message.replace(dir, "<dir>")).toMatchInlineSnapshot(
      `"JSONL file <dir>/damaged.jsonl is damaged at line 3 (byte 16): it is not valid JSON: "{\\"i\\":2, oops}". Only a torn last line is repaired automatically, so the file was left unchanged. Fix or delete line 3, or move the file away to start a new one, then open it again."`,
    );
    expect((error as Error).cause).toBeInstanceOf(SyntaxError);
    expect(readFileSync(file).equals(bytes)).toBe(true);
    expect(readdirSync(dir)).toEqual(["damaged.jsonl"]);

    // An unparsable line followed only by the start of another is damage too, not a torn tail.
    writeFileSync(file, '{"i":0}\nnot json\n{"i":1');
    const second = await rejection(JsonlSink.open(file, byIndex));
    expect(second).toMatchObject({ code: "CHECKPOINT_CORRUPT", details: { line: 2 } });
  });

  it("reports a line whose key cannot be computed as CHECKPOINT_CORRUPT", async () => {
    const dir = await tempDir();
    const file = join(dir, "other.jsonl");
    const bytes = '{"i":0}\n{"id":"a"}\n';
    writeFileSync(file, bytes);
    const strict = {
      key: (r: Rec) => {
        if (typeof r.i !== "number") throw new Error("record has no index");
        return String(r.i);
      },
    };
    const error = await rejection(JsonlSink.open(file, strict));
    expect(error).toMatchObject({ code: "CHECKPOINT_CORRUPT", details: { file, line: 2 } });
    expect((error as Error).message).toContain("the key function threw (record has no index) on it (");
    expect(readFileSync(file, "utf8")).toBe(bytes);
  });

  it("rejects a record whose key cannot be computed with INVALID_ARGUMENT, writing nothing", async () => {
    const dir = await tempDir();
    const file = join(dir, "keys.jsonl");
    const sink = await JsonlSink.open<Rec & { at?: Date }>(file, {
      key: (r) => {
        if (r.i < 0) throw new Error("negative index");
        if (r.at !== undefined) return r.at.toISOString();
        return r.i === 0 ? "" : r.i === 1 ? (42 as unknown as string) : String(r.i);
      },
    });
    const threw = await rejection(sink.append({ i: -1 }));
    expect(isCairnError(threw, "INVALID_ARGUMENT")).toBe(true);
    expect((threw as Error).message.replace(dir, "<dir>")).toMatchInlineSnapshot(
      `"Cannot append to <dir>/keys.jsonl: the key function threw (negative index). Nothing was written. The key must be a non-empty string computed from fields that survive JSON (e.g. an item index or a content hash)."`,
    );
    expect((threw as Error).cause).toBeInstanceOf(Error);
    expect(await rejection(sink.append({ i: 0 }))).toMatchObject({ code: "INVALID_ARGUMENT", message: expect.stringContaining("returned an empty string") });
    expect(await rejection(sink.append({ i: 1 }))).toMatchObject({ code: "INVALID_ARGUMENT", message: expect.stringContaining("returned number 42, not a string") });
    // A key the reopened file could not reproduce (a Date becomes a string in JSON) would break deduplication.
    expect(await rejection(sink.append({ i: 2, at: new Date(0) }))).toMatchObject({
      code: "INVALID_ARGUMENT",
      message: expect.stringContaining("on its JSON form (what reopening the file reads back) it threw"),
    });
    expect(await rejection(sink.append({ i: 3, body: 1n as unknown as string }))).toMatchObject({ code: "INVALID_ARGUMENT" });
    // Misuse does not stop the sink.
    expect(await sink.append({ i: 4 })).toBe(true);
    expect([sink.size, sink.batches]).toEqual([1, 1]);
    await sink.close();
    expect(lines(file)).toEqual(['{"i":4}']);
  });

  it("a failed write rejects with its error, and the sink refuses every later append", async () => {
    const dir = await tempDir();
    const file = join(dir, "full.jsonl");
    // A real write failure: the writer runs with a 32 KB file-size limit, so a write past it fails with EFBIG.
    const child = await runWriter(["fill", file], { fileSizeBlocks: 64 });
    expect(child.code, child.stderr).toBe(0);
    const summary = JSON.parse(child.stdout) as { written: number; first: { code: string }; after: { code: string; message: string } };
    expect(summary.first.code).toBe("EFBIG");
    expect(summary.after.code).toBe("STORE_UNAVAILABLE");
    expect(summary.after.message).toContain("EFBIG");

    // The failed append left a torn line, which the next open cuts: every acknowledged record is there.
    const sink = await JsonlSink.open(file, byIndex);
    expect(sink.size).toBe(summary.written);
    await sink.close();
    expect(lines(file)).toHaveLength(summary.written);
  });

  it("survives SIGKILLs at random moments: every item's record is in the file exactly once", async () => {
    const dir = await tempDir();
    const file = join(dir, "dataset.jsonl");
    const log = join(dir, "checkpoints.log");
    const ITEMS = 800;
    const random = seededRandom(KILL_SEED);
    const context = `seed ${KILL_SEED}`;
    let killed = 0;
    let tornTails = 0;
    let final: Child | undefined;
    for (let attempt = 0; attempt < 12 && final === undefined; attempt += 1) {
      // The first five runs are killed 5–120 ms after their sink is open; the one after is left to finish.
      const killAfterMs = attempt < 5 ? 5 + random() * 115 : undefined;
      const child = await runWriter(["run", file, log, String(ITEMS), "8"], { killAfterMs });
      if (child.killed) {
        killed += 1;
        const text = readFileSync(file, "utf8");
        if (!text.endsWith("\n") && text !== "") tornTails += 1;
        // A kill leaves a prefix of what was written: whole lines that parse, then perhaps a torn piece.
        const whole = text.split("\n").slice(0, -1).map((l) => (JSON.parse(l) as Rec).i);
        expect(new Set(whole).size, context).toBe(whole.length);
        // Every item checkpointed after its append resolved is in the file: no acknowledged record is lost.
        const acknowledged = readFileSync(log, "utf8").split("\n").slice(0, -1).map(Number);
        expect(acknowledged.filter((i) => !whole.includes(i)), context).toEqual([]);
      } else {
        expect(child.code, `${context}\n${child.stderr}`).toBe(0);
        final = child;
      }
    }
    expect(final, context).toBeDefined();
    const summary = JSON.parse(final!.stdout.split("\n").find((l) => l.startsWith("{"))!) as { written: number; skipped: number; batches: number };
    console.log(`JsonlSink kill test (${context}): ${killed} kills, ${tornTails} torn tails left; last run wrote ${summary.written}, skipped ${summary.skipped} already-written items, in ${summary.batches} batches`);
    expect(killed, context).toBeGreaterThanOrEqual(4);

    const records = lines(file).map((l) => JSON.parse(l) as Rec);
    expect(records.map((r) => r.i).sort((a, b) => a - b), context).toEqual(Array.from({ length: ITEMS }, (_, i) => i));
    for (const r of records) expect(r, context).toEqual(recordOf(r.i));
    const reopened = await JsonlSink.open(file, byIndex);
    expect(reopened.size).toBe(ITEMS);
    await reopened.close();
  });
});

/** The fixture's record of item `i`. */
function recordOf(i: number): Rec {
  return { i, body: `item ${i} `.repeat(50 + ((i * 7919) % 800)) };
}

interface Child {
  code: number | null;
  killed: boolean;
  stdout: string;
  stderr: string;
}

/**
 * Run the writer fixture; SIGKILL it `killAfterMs` after it prints `ready` if it is still running. With
 * `fileSizeBlocks`, run it under `ulimit -f` so writes past that size fail.
 */
function runWriter(args: string[], options: { killAfterMs?: number; fileSizeBlocks?: number }): Promise<Child> {
  const node = [process.execPath, "--import", "tsx", WRITER, ...args];
  const child =
    options.fileSizeBlocks === undefined
      ? spawn(node[0]!, node.slice(1), { cwd: REPO, stdio: ["ignore", "pipe", "pipe"] })
      : spawn("/bin/sh", ["-c", `ulimit -f ${options.fileSizeBlocks} && exec "$0" "$@"`, ...node], { cwd: REPO, stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  let killed = false;
  let timer: NodeJS.Timeout | undefined;
  child.stdout.setEncoding("utf8").on("data", (chunk: string) => {
    const wasReady = stdout.includes("ready\n");
    stdout += chunk;
    if (!wasReady && stdout.includes("ready\n") && options.killAfterMs !== undefined) {
      timer = setTimeout(() => {
        killed = child.kill("SIGKILL");
      }, options.killAfterMs);
    }
  });
  child.stderr.setEncoding("utf8").on("data", (chunk: string) => (stderr += chunk));
  return new Promise((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code, signal) => {
      clearTimeout(timer);
      resolve({ code, killed: killed && signal === "SIGKILL", stdout, stderr });
    });
  });
}
