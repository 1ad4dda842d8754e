/**
 * `cairn export` and `cairn import`: a thread moves between stores (file → SQLite → Postgres → file) and
 * resumes in each exactly where it stood, with the same history, spend and checkpoint ids; its artifacts
 * travel with it; bad input writes nothing.
 *
 * The interrupted thread is test/fixtures/pipeline-graph.ts stopped in the middle of its fan-out (some
 * frames saved as pending writes, the others not started); its execution log (PIPELINE_EXEC_LOG) tells
 * which steps and frames each resume ran.
 */
import { createHash } from "node:crypto";
import { cp, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join, relative } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import {
  exportThread,
  importThread,
  listArtifacts,
  listThreads,
  openStore,
  readHistory,
  resume,
  run,
  savedWork,
  spentInAll,
  stateAt,
  workflow,
  writeThreadExport,
  type OpenedStore,
  type ThreadDocument,
} from "cairn";
import pipeline, { coverBytes, frameBytes } from "./fixtures/pipeline-graph.ts";
import plainGraph from "./fixtures/plain-graph.ts";
import { cairn, removeWorkdirs, workdir } from "./helpers/cli.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

// In CI an unreachable server fails this file; elsewhere the Postgres hops are left out with the reason.
const postgres = await requirePostgresInCI();

const GRAPH = "test/fixtures/pipeline-graph.ts";
const INPUT = { frames: 6, delayMs: 20 };
const THREAD = "frames";

const schemas: string[] = [];
afterAll(async () => {
  await removeWorkdirs();
  for (const schema of schemas) await dropSchema(schema);
});

function postgresStore(): string {
  const schema = uniqueSchema("cairn_export");
  schemas.push(schema);
  return postgresUri(schema);
}

async function withStore<T>(uri: string, fn: (store: OpenedStore) => Promise<T>): Promise<T> {
  const store = await openStore(uri);
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}

/** What `cairn history`, `cairn inspect` and a resume see of a thread: the same in every store it moves to. */
async function portrait(uri: string, thread: string) {
  return withStore(uri, async (s) => ({
    history: await readHistory(s.saver, thread),
    saved: await savedWork(s.saver, thread),
    state: (await stateAt(s.saver, s.uri, thread)).values,
    spent: await spentInAll(s.saver, thread),
  }));
}

/** How many times each step or frame started, from the execution log. */
async function started(log: string): Promise<Record<string, number>> {
  const text = await readFile(log, "utf8").catch(() => "");
  const counts: Record<string, number> = {};
  for (const line of text.split("\n")) if (line && !line.endsWith(" end")) counts[line] = (counts[line] ?? 0) + 1;
  return counts;
}

/** Every file under a directory with its size and modification time: equal before and after means nothing was written. */
async function filesOf(root: string): Promise<string[]> {
  const out: string[] = [];
  const walk = async (dir: string): Promise<void> => {
    const entries = await readdir(dir, { withFileTypes: true }).catch(() => []);
    for (const e of entries) {
      const path = join(dir, e.name);
      if (e.isDirectory()) await walk(path);
      else {
        const s = await stat(path);
        out.push(`${relative(root, path)} ${s.size} ${s.mtimeMs}`);
      }
    }
  };
  await walk(root);
  return out.sort();
}

const exists = (path: string) => stat(path).then(() => true, () => false);
const sha256 = (bytes: Uint8Array) => createHash("sha256").update(bytes).digest("hex");
const range = (n: number) => Array.from({ length: n }, (_, i) => i);

/*
 * The interrupted thread, made once in a file store: the pipeline stopped (as Ctrl+C stops it) once two
 * frames had finished, so some frames are saved and the rest never started. And the state and spend of
 * an uninterrupted run of the same input.
 */
let base: string;
let source: string;
let savedFrames: number[];
let expected: { state: Record<string, unknown>; spent: unknown };

beforeAll(async () => {
  base = await workdir("cairn-export-");
  source = `file:${join(base, "source")}`;
  const drain = new AbortController();
  let ended = 0;
  const first = await run(pipeline, {
    input: INPUT,
    thread: THREAD,
    store: source,
    drain: drain.signal,
    onEvent: (e) => {
      if (e.type === "task:end" && e.item !== undefined && (ended += 1) === 2) drain.abort();
    },
  });
  expect(first.status).toBe("stopped");
  savedFrames = (await withStore(source, (s) => savedWork(s.saver, THREAD))).items.render ?? [];
  expect(savedFrames.length).toBeGreaterThanOrEqual(2);
  expect(savedFrames.length).toBeLessThan(INPUT.frames);

  const reference = `file:${join(base, "reference")}`;
  const done = await run(pipeline, { input: INPUT, thread: THREAD, store: reference });
  expected = { state: done.state, spent: await withStore(reference, (s) => spentInAll(s.saver, THREAD)) };
}, 60_000);

// -------------------------------------------------------------------------------------------------

describe("moving an interrupted thread", () => {
  it(`file → SQLite → ${postgres.ok ? "Postgres → " : ""}file: same history, spend and ids in each store; each resumes without rerunning saved work`, async () => {
    const cwd = await workdir();
    const stores = [source, `sqlite:${join(cwd, "hop.db")}`, ...(postgres.ok ? [postgresStore()] : []), `file:${join(cwd, "back")}`];
    const before = await portrait(source, THREAD);
    expect(before.saved).toEqual({ steps: ["plan"], items: { render: savedFrames } });

    // The first hop through the binary, the others through the API; each export is taken from the
    // store the previous hop imported into, before that copy resumes.
    const file = join(cwd, "hop.json");
    const exported = await cairn(cwd, ["export", THREAD, "--store", source, "--out", file]);
    expect(exported.code, exported.stderr).toBe(0);
    expect(exported.stderr).toMatch(
      new RegExp(`^exported thread ${THREAD} from ${source} to ${file}: ${before.history.length} checkpoints, \\d+ pending writes, ${savedFrames.length} artifacts \\(`, "m"),
    );
    const imported = await cairn(cwd, ["import", file, "--store", stores[1]!]);
    expect(imported.code, imported.stderr).toBe(0);
    expect(imported.stdout).toContain(`imported thread ${THREAD} into ${stores[1]}: ${before.history.length} checkpoints, `);
    expect(imported.stdout).toContain(`  status: interrupted · next: render · continue with: cairn resume <graph.ts> --thread ${THREAD} --store ${stores[1]}`);
    expect(await portrait(stores[1]!, THREAD)).toEqual(before);
    for (let i = 2; i < stores.length; i += 1) {
      const doc = await withStore(stores[i - 1]!, (s) => exportThread(s, THREAD));
      expect(doc.store).toBe(i === 2 ? "sqlite" : "postgres");
      await withStore(stores[i]!, (s) => importThread(s, doc));
      expect(await portrait(stores[i]!, THREAD)).toEqual(before);
    }

    const unsaved = range(INPUT.frames).filter((i) => !savedFrames.includes(i));
    for (const [i, store] of stores.slice(1).entries()) {
      const log = join(cwd, `exec-${i}.log`);
      // The binary resumes the first and the last copy; the API (the same code, in this process) the one between.
      if (i === 0 || i === stores.length - 2) {
        const resumed = await cairn(cwd, ["resume", GRAPH, "--thread", THREAD, "--store", store], { PIPELINE_EXEC_LOG: log });
        expect(resumed.code, resumed.stderr).toBe(0);
        expect(resumed.stderr).toContain(`render: ${savedFrames.length} of ${INPUT.frames} items already saved; running the other ${unsaved.length}`);
      } else {
        process.env.PIPELINE_EXEC_LOG = log;
        try {
          expect((await resume(pipeline, { thread: THREAD, store })).status).toBe("completed");
        } finally {
          delete process.env.PIPELINE_EXEC_LOG;
        }
      }
      // Only the frames that never ran, and the step after them: plan and the saved frames did not run again.
      expect(await started(log)).toEqual({ ...Object.fromEntries(unsaved.map((f) => [`render#${f}`, 1])), assemble: 1 });
      const after = await portrait(store, THREAD);
      expect(after.state).toEqual(expected.state);
      expect(after.spent).toEqual(expected.spent);
      expect(after.history.slice(0, before.history.length)).toEqual(before.history);
    }
  }, 120_000);

  it("a failed thread keeps its error in the new store, under a new id; the resume there retries only the failed step", async () => {
    const cwd = await workdir();
    const from = `file:${join(cwd, "plain")}`;
    const to = postgres.ok ? postgresStore() : `sqlite:${join(cwd, "plain.db")}`;
    const env = { FAIL_ONCE_FILE: join(cwd, "failed-once") };
    process.env.FAIL_ONCE_FILE = env.FAIL_ONCE_FILE;
    try {
      expectCode(await rejection(run(plainGraph, { input: { topic: "tides" }, thread: "plain", store: from })), "STEP_FAILED");
    } finally {
      delete process.env.FAIL_ONCE_FILE;
    }

    // Without --out the document goes to stdout, as `cairn export plain > plain.json` writes it.
    const exported = await cairn(cwd, ["export", "plain", "--store", from]);
    expect(exported.code, exported.stderr).toBe(0);
    const doc = JSON.parse(exported.stdout) as ThreadDocument;
    expect(doc).toMatchObject({ format: "cairn.thread", version: 1, thread: "plain", store: "file" });
    expect(doc.checkpoints.at(-1)!.writes.map((w) => w.channel)).toContain("__error__");
    await writeFile(join(cwd, "plain.json"), exported.stdout);

    const imported = await cairn(cwd, ["import", "plain.json", "--thread", "plain-copy", "--store", to]);
    expect(imported.code, imported.stderr).toBe(0);
    expect(imported.stdout).toMatch(/^imported thread plain as plain-copy into /);
    expect(imported.stdout).toMatch(/^ {2}status: failed · next: write_draft · continue with: cairn resume <graph\.ts> --thread plain-copy --store /m);
    const [summary] = await withStore(to, (s) => listThreads(s.saver, ["plain-copy"]));
    expect(summary).toMatchObject({ status: "failed", lastStep: "make_outline", error: "simulated outage in write_draft (FAIL_ONCE_FILE was not there yet)" });

    const resumed = await cairn(cwd, ["resume", "test/fixtures/plain-graph.ts", "--thread", "plain-copy", "--store", to, "--json"], env);
    expect(resumed.code, resumed.stderr).toBe(0);
    expect(JSON.parse(resumed.stdout)).toEqual({
      topic: "tides",
      outline: "outline of tides",
      draft: "draft from outline of tides",
      final: "DRAFT FROM OUTLINE OF TIDES",
      log: ["make_outline", "write_draft", "polish"],
    });
    // The source store still has its own failed thread, untouched.
    expect((await withStore(from, (s) => listThreads(s.saver, ["plain"])))[0]?.status).toBe("failed");
  }, 60_000);
});

// -------------------------------------------------------------------------------------------------

describe("branches and checkpoints", () => {
  // A step whose output differs each time it runs, so the two branches of a restart hold different
  // values under the same channel versions in SQLite (plain integers, minted again on each branch).
  let calls = 0;
  const branchy = workflow("branchy", { state: z.object({ a: z.string().optional(), b: z.number().optional(), c: z.string().optional() }) })
    .step("first", async () => ({ a: "A" }))
    .step("second", async () => ({ b: (calls += 1) }))
    .step("third", async (s) => ({ c: `third saw ${s.b}` }));

  /** The state at every checkpoint of a thread, by id. */
  async function everyState(uri: string, thread: string): Promise<Record<string, unknown>> {
    return withStore(uri, async (s) => {
      const out: Record<string, unknown> = {};
      for (const h of await readHistory(s.saver, thread)) out[h.id] = (await stateAt(s.saver, s.uri, thread, { checkpoint: h.id })).values;
      return out;
    });
  }

  it(`a from-step branch survives SQLite → file${postgres.ok ? " → Postgres" : ""}: both branches in history, each checkpoint's state intact`, async () => {
    const cwd = await workdir();
    const stores = [`sqlite:${join(cwd, "branchy.db")}`, `file:${join(cwd, "branchy")}`, ...(postgres.ok ? [postgresStore()] : [])];
    await run(branchy, { thread: "b", store: stores[0] });
    const restarted = await resume(branchy, { thread: "b", store: stores[0], fromStep: "second" });
    expect(restarted.state).toEqual({ a: "A", b: 2, c: "third saw 2" });
    const history = await withStore(stores[0]!, (s) => readHistory(s.saver, "b"));
    expect(history.map((h) => h.step)).toEqual(["input", "start", "first", "second", "third", "restart:second", "second", "third"]);

    for (let i = 1; i < stores.length; i += 1) {
      const doc = await withStore(stores[i - 1]!, (s) => exportThread(s, "b"));
      const was = { history: await withStore(stores[i - 1]!, (s) => readHistory(s.saver, "b")), states: await everyState(stores[i - 1]!, "b") };
      await withStore(stores[i]!, (s) => importThread(s, doc));
      expect(await withStore(stores[i]!, (s) => readHistory(s.saver, "b"))).toEqual(was.history);
      expect(await everyState(stores[i]!, "b")).toEqual(was.states);
      // The thread branches again in the new store, from the right state; the next hop carries that branch too.
      const again = await resume(branchy, { thread: "b", store: stores[i], fromStep: "third" });
      expect(again.state).toEqual({ a: "A", b: 2, c: "third saw 2" });
    }
    const last = await withStore(stores.at(-1)!, (s) => readHistory(s.saver, "b"));
    expect(last.filter((h) => h.step.startsWith("restart:")).map((h) => h.step)).toEqual(["restart:second", ...stores.slice(1).map(() => "restart:third")]);
  }, 60_000);

  it("--checkpoint exports one checkpoint, which becomes the imported thread's root and resumes from there", async () => {
    const cwd = await workdir();
    const from = `file:${join(cwd, "done")}`;
    await run(pipeline, { input: INPUT, thread: "done", store: from });
    const afterPlan = (await withStore(from, (s) => readHistory(s.saver, "done"))).find((h) => h.step === "plan")!;

    const exported = await cairn(cwd, ["export", "done", "--checkpoint", afterPlan.id, "--store", from, "--out", "plan.json"]);
    expect(exported.code, exported.stderr).toBe(0);
    const doc = JSON.parse(await readFile(join(cwd, "plan.json"), "utf8")) as ThreadDocument;
    expect(doc.checkpoint).toBe(afterPlan.id);
    expect(doc.checkpoints.map((c) => [c.id, c.parent])).toEqual([[afterPlan.id, null]]);
    // Its pending writes are the frames rendered after it, with their artifacts.
    expect(doc.artifacts.map((a) => a.name).sort()).toEqual(range(INPUT.frames).map((f) => `frame-${f}.png`));

    const to = `sqlite:${join(cwd, "plan.db")}`;
    const imported = await withStore(to, (s) => importThread(s, join(cwd, "plan.json")));
    expect(imported.from.checkpoint).toBe(afterPlan.id);
    expect(await withStore(to, (s) => readHistory(s.saver, "done"))).toEqual([{ ...afterPlan, parent: undefined }]);

    const log = join(cwd, "exec.log");
    process.env.PIPELINE_EXEC_LOG = log;
    try {
      expect((await resume(pipeline, { thread: "done", store: to })).state).toEqual(expected.state);
    } finally {
      delete process.env.PIPELINE_EXEC_LOG;
    }
    // The saved frames came along: only the last step ran.
    expect(await started(log)).toEqual({ assemble: 1 });
  }, 60_000);
});

// -------------------------------------------------------------------------------------------------

describe("artifacts", () => {
  let cwd: string;
  let from: string;
  /** The bytes of every artifact the completed thread refers to, by hash. */
  const bytesBySha = new Map<string, Uint8Array>();

  beforeAll(async () => {
    cwd = await workdir();
    from = `file:${join(cwd, "done")}`;
    await run(pipeline, { input: { frames: 3, delayMs: 0 }, thread: "art", store: from });
    const frames = range(3).map((i) => frameBytes("a lighthouse at dusk", i));
    for (const b of [...frames, coverBytes(frames)]) bytesBySha.set(sha256(b), b);
  }, 60_000);

  async function expectArtifactsIn(uri: string, thread: string): Promise<void> {
    await withStore(uri, async (s) => {
      const listed = await listArtifacts(s, thread);
      expect(new Set(listed.map((l) => l.ref.sha256))).toEqual(new Set(bytesBySha.keys()));
      for (const l of listed) {
        expect(l.present).toBe(true);
        expect(await s.artifacts.get(l.ref)).toEqual(bytesBySha.get(l.ref.sha256));
      }
    });
  }

  it("the directory form keeps them as files beside thread.json; importing it restores them", async () => {
    const exported = await cairn(cwd, ["export", "art", "--store", from, "--out", "art/"]);
    expect(exported.code, exported.stderr).toBe(0);
    expect(exported.stderr).toContain(`to ${join(cwd, "art", "thread.json")}: `);
    const files = (await readdir(join(cwd, "art", "artifacts"))).sort();
    expect(files).toEqual([...bytesBySha.keys()].map((sha) => `${sha}.png`).sort());
    for (const f of files) expect(new Uint8Array(await readFile(join(cwd, "art", "artifacts", f)))).toEqual(bytesBySha.get(f.slice(0, 64)));
    const doc = JSON.parse(await readFile(join(cwd, "art", "thread.json"), "utf8")) as ThreadDocument;
    expect(doc.artifacts.every((a) => a.file === `artifacts/${a.sha256}.png` && a.base64 === undefined)).toBe(true);

    const to = `sqlite:${join(cwd, "art.db")}`;
    const imported = await withStore(to, (s) => importThread(s, join(cwd, "art")));
    expect(imported.artifacts).toEqual({ count: 4, bytes: [...bytesBySha.values()].reduce((n, b) => n + b.byteLength, 0), added: 4 });
    await expectArtifactsIn(to, "art");
  }, 60_000);

  it("the single document holds them inline; importing it restores them", async () => {
    const doc = await withStore(from, (s) => exportThread(s, "art"));
    expect(doc.artifacts.map((a) => a.sha256).sort()).toEqual([...bytesBySha.keys()].sort());
    for (const a of doc.artifacts) expect(new Uint8Array(Buffer.from(a.base64!, "base64"))).toEqual(bytesBySha.get(a.sha256));
    const to = postgres.ok ? postgresStore() : `file:${join(cwd, "inline")}`;
    const summary = await withStore(to, (s) => importThread(s, doc, { thread: "art-inline" }));
    expect(summary.artifacts).toEqual({ count: 4, bytes: [...bytesBySha.values()].reduce((n, b) => n + b.byteLength, 0), added: 4 });
    await expectArtifactsIn(to, "art-inline");
  });

  it("refuses a single document above the size limit, pointing at --out <dir>/, and writes nothing", async () => {
    const out = join(cwd, "big.json");
    const error = await rejection(withStore(from, (s) => writeThreadExport(s, "art", out, { maxInlineBytes: 2_000 })));
    expectCode(error, "INVALID_ARGUMENT");
    expect(error.message).toMatch(/^Thread "art" refers to 0\.0 MiB of artifacts \(4 files\), more than the 0\.0 MiB one JSON document holds\. /);
    expect(error.message).toContain("cairn export art --out <dir>/");
    expect(await exists(out)).toBe(false);
    // The directory form takes them.
    const dir = await withStore(from, (s) => writeThreadExport(s, "art", `${join(cwd, "big")}/`, { maxInlineBytes: 2_000 }));
    expect(dir).toMatchObject({ form: "directory", artifacts: { count: 4 } });
  });

  it("a missing artifact is an error naming it, and no export is written", async () => {
    const copy = await workdir();
    await cp(join(cwd, "done"), join(copy, "done"), { recursive: true });
    const frame1 = sha256(frameBytes("a lighthouse at dusk", 1));
    await rm(join(copy, "done", "artifacts", frame1.slice(0, 2), `${frame1}.png`));
    const store = `file:${join(copy, "done")}`;
    const r = await cairn(copy, ["export", "art", "--store", store, "--out", "art.json"]);
    expect(r.code, r.stderr).toBe(1);
    expect(r.stderr).toMatch(
      new RegExp(
        `^cairn: Cannot export thread "art": an artifact it refers to is not in store ${store}: sha256:${frame1.slice(0, 12)}… \\(frame-1\\.png\\), ` +
          `referenced by __cairn_map_render\\[\\d\\]\\.r\\.image in a pending write of checkpoint \\S+, looked for at ${join(copy, "done", "artifacts", frame1.slice(0, 2), frame1)}\\.png\\. Nothing was written\\. `,
      ),
    );
    expect(await exists(join(copy, "art.json"))).toBe(false);
    const error = await rejection(withStore(store, (s) => writeThreadExport(s, "art", join(copy, "art") + "/")));
    expectCode(error, "ARTIFACT_NOT_FOUND");
    expect(await exists(join(copy, "art"))).toBe(false);
  }, 60_000);
});

// -------------------------------------------------------------------------------------------------

describe("bad input leaves the target store untouched", () => {
  let cwd: string;
  let target: string;
  let good: string;
  let before: string[];

  beforeAll(async () => {
    cwd = await workdir();
    good = join(cwd, "good.json");
    await withStore(source, (s) => writeThreadExport(s, THREAD, good));
    target = `file:${join(cwd, "target")}`;
    // The target already holds the thread, so "exists" can be tried too.
    await withStore(target, (s) => importThread(s, good));
    before = await filesOf(join(cwd, "target"));
    expect(before.length).toBeGreaterThan(0);
  }, 60_000);

  /** Import `file` as a new thread: it fails with IMPORT_INVALID and this message, through the binary (exit 2) or the API. */
  async function importFails(file: string, how: "cli" | "api", ...expected: string[]): Promise<void> {
    if (how === "cli") {
      const r = await cairn(cwd, ["import", file, "--thread", "fresh", "--store", target]);
      expect(r.code, r.stderr).toBe(2);
      expect(r.stderr.split("\n").filter(Boolean)).toHaveLength(1);
      for (const text of expected) expect(r.stderr).toContain(text);
    } else {
      const error = await rejection(withStore(target, (s) => importThread(s, file, { thread: "fresh" })));
      expectCode(error, "IMPORT_INVALID");
      for (const text of expected) expect(error.message).toContain(text);
    }
    expect(await filesOf(join(cwd, "target"))).toEqual(before);
  }

  const edited = async (name: string, edit: (doc: Record<string, any>) => void, rechecksum = false): Promise<string> => {
    const doc = JSON.parse(await readFile(good, "utf8")) as Record<string, any>;
    edit(doc);
    if (rechecksum) doc.checksum = `sha256:${createHash("sha256").update(JSON.stringify(doc.checkpoints)).digest("hex")}`;
    const file = join(cwd, name);
    await writeFile(file, JSON.stringify(doc, null, 2));
    return file;
  };

  it("unknown thread or checkpoint: exit 2, no export file", async () => {
    const r = await cairn(cwd, ["export", "nope", "--store", source, "--out", "nope.json"]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(`cairn: No thread "nope" in store ${source}. List the threads with: cairn threads --store ${source}\n`);
    const error = await rejection(withStore(source, (s) => writeThreadExport(s, THREAD, join(cwd, "nope.json"), { checkpoint: "1f0-none" })));
    expectCode(error, "CHECKPOINT_NOT_FOUND");
    expect(error.message).toBe(`No checkpoint "1f0-none" in thread "${THREAD}". List its checkpoints with: cairn history ${THREAD} --store ${source}`);
    expect(await exists(join(cwd, "nope.json"))).toBe(false);
  }, 30_000);

  it("an existing thread id: THREAD_EXISTS naming --thread", async () => {
    const r = await cairn(cwd, ["import", good, "--store", target]);
    expect(r.code).toBe(2);
    expect(r.stderr).toBe(
      `cairn: Thread "${THREAD}" already exists in store ${target}; an import never writes into an existing thread. Import it under another id: cairn import ${good} --thread <new-id> --store ${target}\n`,
    );
    expect(await filesOf(join(cwd, "target"))).toEqual(before);
  }, 30_000);

  it("a newer format version: names the cairn that can read it", async () => {
    const file = await edited("newer.json", (doc) => Object.assign(doc, { version: 2, cairn: "9.1.0" }));
    await importFails(
      file,
      "cli",
      `cairn: ${file} was written by cairn 9.1.0 in thread format version 2; this cairn (0.1.0) reads format version 1. Import it with cairn 9.1.0 or newer, or export the thread again with this one.`,
    );
  }, 30_000);

  it("a truncated file: checked before the store is opened, so not even a new SQLite file appears", async () => {
    const text = await readFile(good, "utf8");
    const file = join(cwd, "truncated.json");
    await writeFile(file, text.slice(0, Math.floor(text.length / 2)));
    const r = await cairn(cwd, ["import", file, "--store", `sqlite:${join(cwd, "never.db")}`]);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stderr).toMatch(new RegExp(`^cairn: ${file} cannot be imported: it is not complete JSON \\(.+\\); the file is truncated or damaged\\. Nothing was written\\. `));
    expect(await exists(join(cwd, "never.db"))).toBe(false);
    await importFails(file, "api", `${file} cannot be imported: it is not complete JSON (`, "; the file is truncated or damaged. Nothing was written.");
  }, 30_000);

  it("a checksum mismatch (an edited value)", async () => {
    const file = await edited("edited.json", (doc) => {
      doc.checkpoints[2].metadata.cairn.usage.usd = 0;
    });
    await importFails(file, "api", `${file} cannot be imported: its checkpoints do not match their checksum (recorded sha256:`, "the file was damaged or edited. Nothing was written.");
  });

  it("a broken structure, even with a matching checksum", async () => {
    const file = await edited("broken.json", (doc) => delete doc.checkpoints[1].checkpoint.channel_versions, true);
    await importFails(file, "api", `${file} cannot be imported: checkpoints[1].checkpoint.channel_versions: `);
    const orphan = await edited("orphan.json", (doc) => doc.checkpoints.reverse(), true);
    await importFails(orphan, "api", `${orphan} cannot be imported: checkpoint ${JSON.parse(await readFile(good, "utf8")).checkpoints.at(-1).id} comes before its parent `);
  });

  it("a damaged artifact file in an export directory", async () => {
    const dir = join(cwd, "dir");
    await withStore(source, (s) => writeThreadExport(s, THREAD, `${dir}/`));
    const [name] = await readdir(join(dir, "artifacts"));
    await writeFile(join(dir, "artifacts", name!), "not the frame");
    await importFails(dir, "api", `${join(dir, "thread.json")} cannot be imported: artifact sha256:${name!.slice(0, 12)}… (frame-`, "is damaged: its 13 bytes hash to sha256:");
    await rm(join(dir, "artifacts", name!));
    await importFails(dir, "api", `${join(dir, "thread.json")} cannot be imported: artifact sha256:${name!.slice(0, 12)}… (frame-`, `should be in ${join(dir, "artifacts", name!)}, which cannot be read (ENOENT)`);
  });
});

describe("a write failing midway", () => {
  const kinds = ["file", "sqlite", ...(postgres.ok ? ["postgres"] : [])] as const;
  for (const kind of kinds) {
    it(`${kind}: deletes the partly imported thread before reporting`, async () => {
      const cwd = await workdir();
      const uri = kind === "file" ? `file:${join(cwd, "store")}` : kind === "sqlite" ? `sqlite:${join(cwd, "store.db")}` : postgresStore();
      const doc = await withStore(source, (s) => exportThread(s, THREAD));
      await withStore(uri, async (store) => {
        const put = store.saver.put.bind(store.saver);
        let puts = 0;
        store.saver.put = async (...args) => {
          if ((puts += 1) === 3) throw new Error("disk full (simulated)");
          return put(...args);
        };
        const error = await rejection(importThread(store, doc));
        expectCode(error, "STORE_UNAVAILABLE");
        expect(error.message).toBe(
          `Importing thread "${THREAD}" into ${store.uri} failed at checkpoint 3 of ${doc.checkpoints.length} (${doc.checkpoints[2]!.id}): disk full (simulated). ` +
            `The partly imported thread was deleted; the store holds nothing of it. Run the import again once the store works.`,
        );
        expect(await store.saver.getTuple({ configurable: { thread_id: THREAD, checkpoint_ns: "" } })).toBeUndefined();
        expect(await store.listThreadIds()).toEqual([]);
        store.saver.put = put;
      });
      // Once the store works, the same import goes through.
      await withStore(uri, (s) => importThread(s, doc));
      expect(await portrait(uri, THREAD)).toEqual(await portrait(source, THREAD));
    });
  }
});
