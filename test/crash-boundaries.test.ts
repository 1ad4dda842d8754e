import { spawnSync } from "node:child_process";
import { cp, mkdir, mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, relative } from "node:path";
import type { Checkpoint, CheckpointMetadata, CheckpointTuple } from "@langchain/langgraph-checkpoint";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { FileCheckpointSaver, openStore, verifyStore } from "../src/index.ts";
import { CRASH_VARIANTS, FaultFs, describeBoundary, type Boundary } from "./helpers/fault-fs.ts";

/*
 * Crash at every write / fsync / rename boundary of the file store (issue 5, item 1). For each scenario
 * (a thread's first write into a new store, a put by a new writer and by one already open, putWrites,
 * compaction), a clean run records the sequence of boundaries; then for every boundary k the scenario
 * runs again and the process "stops" at k (cleanly, and with the write at k torn in half), and every
 * state the disk could hold afterwards (see test/helpers/fault-fs.ts) is opened by a fresh saver:
 * it must read exactly the old or the new checkpoints (full values), `verifyStore` must report no
 * damage, a further put must work, and the writer must have removed every leftover temporary file.
 */

const THREAD = "t-1";
let root: string;

/** A pid no process has: the crashed process is dead, as after a real crash. */
function deadPid(): number {
  const child = spawnSync(process.execPath, ["-e", ""]);
  return child.pid!;
}

const cpId = (n: number) => `1ef4f797-8335-6428-8001-${String(n).padStart(12, "0")}`;

function checkpoint(n: number): { checkpoint: Checkpoint; metadata: CheckpointMetadata; versions: Record<string, string> } {
  const a = `value of a at ${n}: ${"x".repeat(2000)}`;
  const b = { note: "written once, read by every later checkpoint", list: Array.from({ length: 50 }, (_, i) => i) };
  const checkpoint: Checkpoint = {
    v: 4,
    id: cpId(n),
    ts: new Date(Date.UTC(2024, 0, 1, 0, 0, n)).toISOString(),
    channel_values: { a, b },
    channel_versions: { a: `${String(n).padStart(4, "0")}`, b: "0001" },
    versions_seen: { [`s${n}`]: { a: `${String(n).padStart(4, "0")}` } },
  };
  const metadata = { source: "loop", step: n, parents: {}, cairn: { step: `s${n}` } } as unknown as CheckpointMetadata;
  const versions: Record<string, string> = n === 1 ? { a: "0001", b: "0001" } : { a: `${String(n).padStart(4, "0")}` };
  return { checkpoint, metadata, versions };
}

async function put(saver: FileCheckpointSaver, n: number, parent?: string): Promise<void> {
  const { checkpoint: c, metadata, versions } = checkpoint(n);
  await saver.put({ configurable: { thread_id: THREAD, checkpoint_ns: "", ...(parent ? { checkpoint_id: parent } : {}) } }, c, metadata, versions);
}

async function putWrites(saver: FileCheckpointSaver, n: number, task: string): Promise<void> {
  await saver.putWrites(
    { configurable: { thread_id: THREAD, checkpoint_ns: "", checkpoint_id: cpId(n) } },
    [
      ["a", `${task} wrote ${"y".repeat(1500)}`],
      ["b", { from: task }],
    ],
    task,
  );
}

async function readAll(dir: string): Promise<CheckpointTuple[]> {
  const saver = new FileCheckpointSaver({ dir });
  try {
    const out: CheckpointTuple[] = [];
    for await (const t of saver.list({ configurable: { thread_id: THREAD } })) out.push(t);
    return out;
  } finally {
    await saver.close();
  }
}

interface Scenario {
  name: string;
  /** Make the store the scenario starts from (with the real file system). */
  setup(store: string): Promise<void>;
  /** What the crashing process does; `arm` starts counting boundaries (what comes before it is not crashed in). */
  action(saver: FileCheckpointSaver, arm: () => Promise<void>): Promise<void>;
}

const scenarios: Scenario[] = [
  {
    name: "the first put into a new store (store marker, thread folder, journal, lock)",
    setup: async () => {},
    action: async (saver, arm) => {
      await arm();
      await put(saver, 1);
    },
  },
  {
    name: "a put by a new writer of an existing thread (lock taken, journal reopened after a clean close)",
    setup: async (store) => {
      const saver = new FileCheckpointSaver({ dir: store });
      await put(saver, 1);
      await saver.close();
    },
    action: async (saver, arm) => {
      await arm();
      await put(saver, 2, cpId(1));
    },
  },
  {
    name: "a put by a writer already open",
    setup: async (store) => {
      const saver = new FileCheckpointSaver({ dir: store });
      await put(saver, 1);
      await saver.close();
    },
    action: async (saver, arm) => {
      await put(saver, 2, cpId(1));
      await arm();
      await put(saver, 3, cpId(2));
    },
  },
  {
    name: "putWrites by a new writer",
    setup: async (store) => {
      const saver = new FileCheckpointSaver({ dir: store });
      await put(saver, 1);
      await put(saver, 2, cpId(1));
      await saver.close();
    },
    action: async (saver, arm) => {
      await arm();
      await putWrites(saver, 2, "task-1");
    },
  },
  {
    name: "putWrites by a writer already open",
    setup: async (store) => {
      const saver = new FileCheckpointSaver({ dir: store });
      await put(saver, 1);
      await saver.close();
    },
    action: async (saver, arm) => {
      await put(saver, 2, cpId(1));
      await putWrites(saver, 2, "task-1");
      await arm();
      await putWrites(saver, 2, "task-2");
    },
  },
  {
    name: "compaction (deleteCheckpoints)",
    setup: async (store) => {
      const saver = new FileCheckpointSaver({ dir: store });
      await put(saver, 1);
      await put(saver, 2, cpId(1));
      await putWrites(saver, 2, "task-1");
      await put(saver, 3, cpId(2));
      await putWrites(saver, 3, "task-1");
      await saver.close();
    },
    action: async (saver, arm) => {
      await arm();
      await saver.deleteCheckpoints(THREAD, [cpId(1)]);
    },
  },
  {
    name: "a put right after a compaction by the same writer",
    setup: async (store) => {
      const saver = new FileCheckpointSaver({ dir: store });
      await put(saver, 1);
      await put(saver, 2, cpId(1));
      await saver.close();
    },
    action: async (saver, arm) => {
      await put(saver, 3, cpId(2));
      await saver.deleteCheckpoints(THREAD, [cpId(1)]);
      await arm();
      await put(saver, 4, cpId(3));
    },
  },
];

/** Names of temporary files a crash can leave; none may survive the next writer. */
const LEFTOVER = /^\.writer\.lock\.|^writer\.lock\.stale-|^journal\.log\.compact-|^journal\.log\.unfinished-|^\.deleted-|\.tmp-|^\..*\.tmp$/;

async function filesUnder(dir: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(dir, { withFileTypes: true, recursive: true })) {
    const rel = relative(dir, join(e.parentPath ?? (e as unknown as { path: string }).path, e.name));
    out.push(rel);
  }
  return out.sort();
}

/** Strip what differs between two reads of one checkpoint and is not its content. */
const shape = (tuples: CheckpointTuple[]) => tuples.map((t) => ({ config: t.config, parentConfig: t.parentConfig, checkpoint: t.checkpoint, metadata: t.metadata, pendingWrites: t.pendingWrites }));

interface Outcome {
  boundaries: Boundary[];
  checked: number;
  failures: string[];
}

async function runScenario(scenario: Scenario, index: number): Promise<Outcome> {
  const base = join(root, `s${index}`);
  const disk = join(base, "disk");
  const store = join(disk, "store");
  await mkdir(disk, { recursive: true });
  await scenario.setup(store);

  // A clean run: the boundaries, and the checkpoints before (at arm) and after.
  const cleanDisk = join(base, "clean");
  await cp(disk, cleanDisk, { recursive: true });
  const clean = await FaultFs.create(cleanDisk);
  let before: CheckpointTuple[] = [];
  {
    const saver = new FileCheckpointSaver({ dir: join(cleanDisk, "store") }, { fs: clean.fs, pid: deadPid() });
    await scenario.action(saver, async () => {
      before = await readAll(join(cleanDisk, "store"));
      clean.armed = true;
    });
    await clean.release();
  }
  const after = await readAll(join(cleanDisk, "store"));
  const allowed = [shape(before), shape(after)];
  const boundaries = clean.boundaries;
  const failures: string[] = [];
  let checked = 0;

  for (const b of boundaries) {
    for (const mode of b.op === "write" || b.op === "writeFile" ? (["clean", "torn"] as const) : (["clean"] as const)) {
      const run = join(base, `k${b.n}-${mode}`);
      await cp(disk, join(run, "disk"), { recursive: true });
      const ffs = await FaultFs.create(join(run, "disk"));
      ffs.crashAt = b.n;
      ffs.crashMode = mode;
      const saver = new FileCheckpointSaver({ dir: join(run, "disk", "store") }, { fs: ffs.fs, pid: deadPid() });
      try {
        await scenario.action(saver, async () => {
          ffs.armed = true;
        });
      } catch {
        // the simulated crash (or what the saver made of it)
      }
      await ffs.release();
      const where = `${describeBoundary(b, cleanDisk)} (${mode})`;
      if (!ffs.crashed) {
        failures.push(`${where}: the run never reached this boundary`);
        continue;
      }
      const seen = new Set<string>();
      for (const variant of CRASH_VARIANTS) {
        const target = join(run, variant);
        const hash = await ffs.materialize(variant, target);
        if (seen.has(hash)) continue;
        seen.add(hash);
        checked += 1;
        const problems = await checkAfterCrash(join(target, "store"), allowed);
        for (const p of problems) failures.push(`${where}, ${variant}: ${p}`);
      }
      await rm(run, { recursive: true, force: true });
    }
  }
  return { boundaries, checked, failures };
}

/** Open the store a crash left: old or new checkpoints exactly, no damage reported, writable, no leftovers. */
async function checkAfterCrash(store: string, allowed: ReturnType<typeof shape>[]): Promise<string[]> {
  const problems: string[] = [];
  const saver = new FileCheckpointSaver({ dir: store });
  let latest: CheckpointTuple | undefined;
  try {
    const listed: CheckpointTuple[] = [];
    for await (const t of saver.list({ configurable: { thread_id: THREAD } })) listed.push(t);
    latest = await saver.getTuple({ configurable: { thread_id: THREAD } });
    const got = shape(listed);
    const match = allowed.findIndex((a) => JSON.stringify(a) === JSON.stringify(got));
    if (match === -1) {
      problems.push(`reads neither the old nor the new checkpoints: ${JSON.stringify(got.map((t) => [t.checkpoint.id, t.pendingWrites?.length]))}, expected ${allowed.map((a) => JSON.stringify(a.map((t) => [t.checkpoint.id, t.pendingWrites?.length]))).join(" or ")}`);
    } else {
      try {
        expect(listed).toEqual(got.length ? listed : []);
        expect(latest ? shape([latest]) : []).toEqual(got.slice(0, 1));
      } catch (error) {
        problems.push(`getTuple disagrees with list: ${(error as Error).message.split("\n")[0]}`);
      }
    }
  } catch (error) {
    problems.push(`reading fails: ${(error as Error).message}`);
  }

  try {
    const opened = await openStore(`file:${store}`);
    try {
      const report = await verifyStore(opened);
      if (report.problems.length > 0) problems.push(`cairn verify reports damage: ${report.problems.map((p) => `${p.file} ${p.what}`).join("; ")}`);
    } finally {
      await opened.close();
    }
  } catch (error) {
    problems.push(`cairn verify fails: ${(error as Error).message}`);
  }

  try {
    await put(saver, 50, latest?.checkpoint.id);
    const again = await saver.getTuple({ configurable: { thread_id: THREAD } });
    if (again?.checkpoint.id !== cpId(50)) problems.push(`a further put does not read back (latest is ${again?.checkpoint.id})`);
  } catch (error) {
    problems.push(`a further put fails: ${(error as Error).message}`);
  }
  await saver.close().catch((error: Error) => problems.push(`closing fails: ${error.message}`));
  const left = (await filesUnder(store).catch(() => [] as string[])).filter((f) => LEFTOVER.test(f.split("/").pop()!));
  if (left.length > 0) problems.push(`temporary files left after the next writer: ${left.join(", ")}`);
  return problems;
}

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), "cairn-crash-k-"));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe("a crash at every write, fsync and rename of the file store", () => {
  scenarios.forEach((scenario, i) => {
    it(scenario.name, async () => {
      const { boundaries, checked, failures } = await runScenario(scenario, i);
      // The scenario really wrote: some boundaries of each kind it should have.
      expect(boundaries.length).toBeGreaterThanOrEqual(2);
      expect(boundaries.some((b) => b.op === "datasync" || b.op === "sync")).toBe(true);
      expect(checked).toBeGreaterThanOrEqual(boundaries.length);
      expect(failures).toEqual([]);
    }, 180_000);
  });
});
