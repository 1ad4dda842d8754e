import { existsSync, readFileSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { afterAll, describe, expect, it } from "vitest";
import { cairn, removeWorkdirs, spawnCairn, workdir } from "./helpers/cli.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

/**
 * One writer per thread, with real processes on every store: a second process fails fast naming the
 * holder; a SIGKILLed holder's lock is taken over; a SIGSTOPped holder whose lock was broken, or whose
 * lease ran out and was taken over, writes nothing anyone reads when it wakes, and stops with THREAD_LOCKED.
 */

const GRAPH = "test/fixtures/gate-graph.ts";
const postgres = await requirePostgresInCI();
const schemas: string[] = [];

afterAll(async () => {
  await removeWorkdirs();
  for (const s of schemas) await dropSchema(s).catch(() => {});
});

const stores: { name: string; ok: boolean; uri: (dir: string) => string }[] = [
  { name: "file", ok: true, uri: (dir) => `file:${join(dir, ".cairn")}` },
  { name: "sqlite", ok: true, uri: (dir) => `sqlite:${join(dir, "cairn.db")}` },
  {
    name: "postgres",
    ok: postgres.ok,
    uri: () => {
      const schema = uniqueSchema("cairn_fence");
      schemas.push(schema);
      return postgresUri(schema);
    },
  },
];

/** Wait (polling a file, no fixed sleep) until `path` exists; fails at once if the child exits first. */
async function waitForFile(path: string, what: string, child: { done: Promise<{ code: number; stderr: string }> }, timeoutMs = 50_000): Promise<void> {
  let exited: { code: number; stderr: string } | undefined;
  void child.done.then((r) => (exited = r));
  const until = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (exited) throw new Error(`${what}: the process exited (${exited.code}) first: ${exited.stderr}`);
    if (Date.now() > until) throw new Error(`${what}: ${path} did not appear within ${timeoutMs} ms`);
    await sleep(20);
  }
}

async function setup(uri: (dir: string) => string) {
  const dir = await workdir("cairn-fence-");
  const gate = join(dir, "gate");
  await mkdir(gate);
  const log = join(dir, "exec.log");
  const store = uri(dir);
  // A lease far longer than any of these tests: a lock is lost here only through the kill or
  // `unlock --force` each test makes, never because a loaded machine let the paused holder's lease run out.
  const env = { GATE_LOG: log, CAIRN_LEASE_MS: "600000" };
  const runs = () => readFileSync(log, "utf8").trim().split("\n");
  return { dir, gate, log, store, env, runs };
}

async function finalState(dir: string, store: string, thread: string) {
  const inspected = await cairn(dir, ["inspect", thread, "--json", "--store", store]);
  expect(inspected.code, inspected.stderr).toBe(0);
  return { values: JSON.parse(inspected.stdout) as Record<string, unknown> };
}

async function historySteps(dir: string, store: string, thread: string): Promise<string[]> {
  const history = await cairn(dir, ["history", thread, "--json", "--store", store]);
  expect(history.code, history.stderr).toBe(0);
  const entries = JSON.parse(history.stdout) as { checkpoints?: { step?: string }[] } | { step?: string }[];
  const list = Array.isArray(entries) ? entries : (entries.checkpoints ?? []);
  return list.map((e) => e.step ?? "").filter((s) => s !== "");
}

/**
 * The woken holder stopped with THREAD_LOCKED, and readers see the process that took over: its history
 * and state, with nothing of the woken holder's after the takeover.
 */
async function expectZombieFenced(
  dir: string,
  store: string,
  zombie: { child: { pid?: number }; done: Promise<{ code: number; stderr: string }> },
  runs: () => string[],
): Promise<void> {
  const zpid = zombie.child.pid!;
  const woke = await zombie.done;
  expect(woke.code).toBe(1);
  expect(woke.stderr).toMatch(/THREAD_LOCKED|lost the writer lock|no longer holds the writer lock/);
  const resumer = Number(runs().find((l) => l.startsWith("last "))!.split(" ")[1]);
  expect(resumer).not.toBe(zpid);
  const state = await finalState(dir, store, "t");
  expect(state.values).toMatchObject({ firstBy: zpid, middleBy: resumer, lastBy: resumer });
  const steps = await historySteps(dir, store, "t");
  expect(steps.filter((s) => s === "middle")).toHaveLength(1);
  expect(steps.filter((s) => s === "last")).toHaveLength(1);
}

describe.each(stores)("one writer per thread ($name store)", { timeout: 120_000 }, ({ name, ok, uri }) => {
  it.skipIf(!ok)("two processes on one thread: the second fails fast with THREAD_LOCKED naming the holder; each step runs once", async () => {
    const { dir, gate, store, env, runs } = await setup(uri);
    const first = spawnCairn(dir, ["run", GRAPH, "--thread", "t", "--store", store], { ...env, GATE_DIR: gate });
    await waitForFile(join(gate, `started-${first.child.pid}`), "the first process reaching the gate", first);
    const second = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
    expect(second.code).toBe(1);
    expect(second.stderr).toContain(`pid ${first.child.pid} on ${hostname()}`);
    expect(second.stderr).toMatch(/since \d{4}-\d\d-\d\dT/);
    expect(second.stderr).toContain("cairn unlock t --force");
    await writeFile(join(gate, "go"), "");
    const done = await first.done;
    expect(done.code, done.stderr).toBe(0);
    // The refused process ran nothing.
    expect(runs()).toEqual([`first ${first.child.pid}`, `middle ${first.child.pid}`, `last ${first.child.pid}`]);
    const state = await finalState(dir, store, "t");
    expect(state.values).toMatchObject({ firstBy: first.child.pid, middleBy: first.child.pid, lastBy: first.child.pid });
    expect(await historySteps(dir, store, "t")).toEqual(expect.arrayContaining(["first", "middle", "last"]));
  });

  it.skipIf(!ok)("a holder killed with SIGKILL leaves a stale lock that the next resume takes over", async () => {
    const { dir, gate, store, env, runs } = await setup(uri);
    const first = spawnCairn(dir, ["run", GRAPH, "--thread", "t", "--store", store], { ...env, GATE_DIR: gate });
    await waitForFile(join(gate, `started-${first.child.pid}`), "the first process reaching the gate", first);
    first.child.kill("SIGKILL");
    await first.done;
    const second = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
    expect(second.code, second.stderr).toBe(0);
    const pid = first.child.pid!;
    const resumedBy = runs().at(-1)!.split(" ")[1];
    expect(runs()).toEqual([`first ${pid}`, `middle ${pid}`, `middle ${resumedBy}`, `last ${resumedBy}`]);
    const state = await finalState(dir, store, "t");
    expect(state.values).toMatchObject({ firstBy: pid, middleBy: Number(resumedBy), lastBy: Number(resumedBy) });
  });

  it.skipIf(!ok)("a paused holder whose lock was broken writes nothing anyone reads when it wakes, and stops with THREAD_LOCKED", async () => {
    const { dir, gate, store, env, runs } = await setup(uri);
    const zombie = spawnCairn(dir, ["run", GRAPH, "--thread", "t", "--store", store], { ...env, GATE_DIR: gate });
    const zpid = zombie.child.pid!;
    await waitForFile(join(gate, `started-${zpid}`), "the first process reaching the gate", zombie);
    zombie.child.kill("SIGSTOP");
    try {
      // The paused holder looks alive: a plain resume is refused, a plain unlock too.
      const refused = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toContain(`pid ${zpid}`);
      expect((await cairn(dir, ["unlock", "t", "--store", store])).code).toBe(1);
      const unlocked = await cairn(dir, ["unlock", "t", "--force", "--store", store]);
      expect(unlocked.code, unlocked.stderr).toBe(0);
      expect(unlocked.stdout).toContain(`held by pid ${zpid}`);
      const second = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
      expect(second.code, second.stderr).toBe(0);
      // Wake the zombie: its step finishes and it tries to save it.
      await writeFile(join(gate, "go"), "");
    } finally {
      zombie.child.kill("SIGCONT");
    }
    await expectZombieFenced(dir, store, zombie, runs);
    const log = runs();
    // And a resume now finds the thread finished.
    const again = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
    expect(again.code, again.stderr).toBe(0);
    expect(runs()).toEqual(log);
    void name;
  });

  it.skipIf(!ok)("a paused holder whose lease ran out is taken over by a plain resume, and writes nothing anyone reads when it wakes", async () => {
    const { dir, gate, store, env, runs } = await setup(uri);
    // The paused holder's lease is short; the process taking over keeps the long one from setup().
    const zombie = spawnCairn(dir, ["run", GRAPH, "--thread", "t", "--store", store], { ...env, GATE_DIR: gate, CAIRN_LEASE_MS: "1500" });
    const zpid = zombie.child.pid!;
    await waitForFile(join(gate, `started-${zpid}`), "the first process reaching the gate", zombie);
    zombie.child.kill("SIGSTOP");
    try {
      // No unlock: once the stopped holder's lease has run out, a resume takes the thread over.
      let second = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
      for (const until = Date.now() + 60_000; second.code !== 0 && Date.now() < until; ) {
        expect(second.stderr).toContain(`pid ${zpid}`);
        await sleep(250);
        second = await cairn(dir, ["resume", GRAPH, "--thread", "t", "--store", store], env);
      }
      expect(second.code, second.stderr).toBe(0);
      await writeFile(join(gate, "go"), "");
    } finally {
      zombie.child.kill("SIGCONT");
    }
    await expectZombieFenced(dir, store, zombie, runs);
  });
});
