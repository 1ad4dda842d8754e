/**
 * Resuming a thread under code or input that changed since its work was saved: fingerprints that refuse
 * unsafe resumes (and say the ways on), the resume preview, and state schema migrations. Through the
 * public API on the file, SQLite and Postgres stores, and through the `cairn` binary.
 */
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Annotation, END, START, StateGraph } from "@langchain/langgraph";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { appendList, openStore, previewResume, readHistory, resume, run, workflow, type OpenedStore, type Workflow } from "cairn";
import { cairn, removeWorkdirs, workdir } from "./helpers/cli.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();

// -------------------------------------------------------------------------------------------------
// A workflow whose shape, step fingerprint, version and schema each test can vary.

interface Variant {
  prompt?: string;
  /** A step inserted after "plan". */
  insert?: boolean;
  /** A step appended at the end. */
  append?: boolean;
  /** Drop the last step ("write"). */
  dropWrite?: boolean;
  version?: string;
  fail?: { step?: string; item?: number };
  ran?: string[];
}

const State = z.object({
  topic: z.string(),
  plan_text: z.string().optional(),
  parts: appendList(z.string()),
  draft: z.string().optional(),
  extra: z.string().optional(),
});

function demo(v: Variant = {}) {
  const ran = v.ran ?? [];
  let wf: Workflow<typeof State, string> = workflow("resume-safety", { state: State, defaultInput: { topic: "tides" }, version: v.version ?? "1" }).step(
    "plan",
    async (s) => {
      ran.push("plan");
      return { plan_text: `plan of ${s.topic}` };
    },
    { fingerprint: { prompt: v.prompt ?? "Plan: {topic}", model: "m1" } },
  );
  if (v.insert) wf = wf.step("review", async () => (ran.push("review"), { extra: "reviewed" }));
  const withMap = wf.map("sections", {
    over: () => [0, 1, 2, 3],
    run: async (i: number) => {
      ran.push(`sections[${i}]`);
      if (v.fail?.item === i) throw new Error(`section ${i} failed`);
      return `section ${i}`;
    },
    into: "parts",
    retry: false,
  });
  const full = v.dropWrite
    ? withMap
    : withMap.step(
        "write",
        async (s) => {
          ran.push("write");
          if (v.fail?.step === "write") throw new Error("write failed");
          return { draft: `${s.plan_text}: ${s.parts.join(", ")}` };
        },
        { retry: false },
      );
  return v.append ? full.step("polish", async (s) => (ran.push("polish"), { extra: `${s.draft}!` })) : full;
}

// -------------------------------------------------------------------------------------------------

interface StoreCase {
  name: string;
  skip?: string;
  open(): Promise<OpenedStore>;
  cleanup(): Promise<void>;
}

const dirs: string[] = [];
const schemas: string[] = [];
const storeCases: StoreCase[] = [
  {
    name: "file",
    open: async () => {
      const dir = await mkdtemp(join(tmpdir(), "cairn-safety-"));
      dirs.push(dir);
      return openStore(`file:${dir}`);
    },
    cleanup: async () => {},
  },
  {
    name: "sqlite",
    open: async () => {
      const dir = await mkdtemp(join(tmpdir(), "cairn-safety-"));
      dirs.push(dir);
      return openStore(`sqlite:${join(dir, "c.db")}`);
    },
    cleanup: async () => {},
  },
  {
    name: "postgres",
    skip: postgres.ok ? undefined : postgres.reason,
    open: async () => {
      const schema = uniqueSchema("cairn_safety");
      schemas.push(schema);
      return openStore(postgresUri(schema));
    },
    cleanup: async () => {},
  },
];

afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
  if (postgres.ok) for (const s of schemas) await dropSchema(s);
  await removeWorkdirs();
});

describe.each(storeCases)("fingerprints on the $name store", (sc) => {
  let store: OpenedStore;
  beforeAll(async () => {
    if (sc.skip) return;
    store = await sc.open();
  });
  afterAll(async () => {
    await store?.close();
  });

  const failedThread = async (thread: string) => {
    const error = await rejection(run(demo({ fail: { step: "write" } }), { thread, store }));
    expectCode(error, "STEP_FAILED");
  };

  it.skipIf(!!sc.skip)("resumes as before when nothing changed", async () => {
    await failedThread("same");
    const ran: string[] = [];
    const result = await resume(demo({ ran }), { thread: "same", store });
    expect(result.status).toBe("completed");
    expect(ran).toEqual(["write"]);
  });

  it.skipIf(!!sc.skip)("refuses a stale step, names it, and lets --from-step or --force continue", async () => {
    await failedThread("stale");
    const before = (await readHistory(store.saver, "stale")).length;
    const error = await rejection(resume(demo({ prompt: "Plan briefly: {topic}" }), { thread: "stale", store }));
    expectCode(error, "FINGERPRINT_MISMATCH");
    expect(error.message).toContain(`step "plan" is stale`);
    expect(error.message).toContain("--from-step plan");
    expect(error.message).toContain("--force");
    expect(error.details.stale).toEqual(["plan"]);
    // Refused before anything was written.
    expect((await readHistory(store.saver, "stale")).length).toBe(before);

    const forcedRan: string[] = [];
    const notices: string[] = [];
    const forced = await resume(demo({ prompt: "Plan briefly: {topic}", ran: forcedRan }), {
      thread: "stale",
      store,
      force: true,
      onStart: (i) => notices.push(...i.notices),
    });
    expect(forced.status).toBe("completed");
    expect(forcedRan).toEqual(["write"]);
    expect(notices.join("\n")).toMatch(/--force.*"plan" is stale/);
  });

  it.skipIf(!!sc.skip)("a restart from the stale step reruns it and records the new fingerprint", async () => {
    await failedThread("stale-restart");
    const ran: string[] = [];
    const result = await resume(demo({ prompt: "Plan v2", ran }), { thread: "stale-restart", store, fromStep: "plan" });
    expect(result.status).toBe("completed");
    expect(ran.filter((r) => r === "plan")).toHaveLength(1);
    // The rerun recorded the new fingerprint: the next restart from a later step is not refused.
    const again = await resume(demo({ prompt: "Plan v2" }), { thread: "stale-restart", store, fromStep: "write" });
    expect(again.status).toBe("completed");
  });

  it.skipIf(!!sc.skip)("refuses a step inserted before finished work, naming it and the first affected step", async () => {
    await failedThread("inserted");
    const error = await rejection(resume(demo({ insert: true }), { thread: "inserted", store }));
    expectCode(error, "FINGERPRINT_MISMATCH");
    expect(error.message).toContain(`step "review" was added after "plan"`);
    expect(error.message).toContain("Finished work this affects: sections.");
    expect(error.details.fromStep).toBe("sections");
    const ran: string[] = [];
    const result = await resume(demo({ insert: true, ran }), { thread: "inserted", store, fromStep: "sections" });
    expect(result.status).toBe("completed");
    // "plan" is kept; the inserted step runs, then the fan-out again, then the rest.
    expect(ran[0]).toBe("review");
    expect(ran).not.toContain("plan");
    expect(result.state.extra).toBe("reviewed");
  });

  it.skipIf(!!sc.skip)("continues with a notice when the change touches no finished step", async () => {
    await failedThread("appended");
    const notices: string[] = [];
    const ran: string[] = [];
    const result = await resume(demo({ append: true, ran }), { thread: "appended", store, onStart: (i) => notices.push(...i.notices) });
    expect(result.status).toBe("completed");
    expect(ran).toEqual(["write", "polish"]);
    expect(notices.join("\n")).toContain(`step "polish" was added after "write"`);
  });

  it.skipIf(!!sc.skip)("refuses a new version of the workflow", async () => {
    await failedThread("versioned");
    const error = await rejection(resume(demo({ version: "2" }), { thread: "versioned", store }));
    expectCode(error, "FINGERPRINT_MISMATCH");
    expect(error.message).toContain("version 1 → 2");
    expect(error.details.fromStep).toBe("plan");
  });

  it.skipIf(!!sc.skip)("refuses a thread due to run a step that no longer exists, even with force", async () => {
    await failedThread("dropped");
    const error = await rejection(resume(demo({ dropWrite: true }), { thread: "dropped", store, force: true }));
    expectCode(error, "FINGERPRINT_MISMATCH");
    expect(error.message).toContain(`due to run "write", which the workflow no longer has`);
    expect(error.message).toContain("--force cannot help");
  });

  it.skipIf(!!sc.skip)("checks the input given to resume against the one the thread started with", async () => {
    await failedThread("input");
    const error = await rejection(resume(demo(), { thread: "input", store, input: { topic: "moons" } }));
    expectCode(error, "FINGERPRINT_MISMATCH");
    expect(error.message).toContain(`input field "topic" changed`);
    // An input change is not fixed by a restart (the state holds the old input): no --from-step offered.
    expect(error.message).not.toContain("--from-step");
    const same = await resume(demo(), { thread: "input", store, input: { topic: "tides" } });
    expect(same.status).toBe("completed");
  });

  it.skipIf(!!sc.skip)("previews a resume inside a fan-out without running or writing anything", async () => {
    const error = await rejection(run(demo({ fail: { item: 2 } }), { thread: "preview", store }));
    expectCode(error, "STEP_FAILED");
    const history = await readHistory(store.saver, "preview");
    const plan = await previewResume(demo(), { thread: "preview", store });
    expect(plan.outcome).toBe("runs");
    expect(plan.steps.map((s) => [s.step, s.action, s.reason])).toEqual([
      ["plan", "reuse", undefined],
      ["sections", "run", "failed"],
      ["write", "later", "never ran"],
    ]);
    expect(plan.steps[1]!.items).toEqual({ total: 4, saved: 3, failed: 1, toRun: 1 });
    expect(await readHistory(store.saver, "preview")).toEqual(history);

    const restart = await previewResume(demo(), { thread: "preview", store, fromStep: "plan" });
    expect(restart.steps.map((s) => [s.step, s.action, s.reason])).toEqual([
      ["plan", "run", "restarted"],
      // In progress on the branch a restart leaves behind: it runs again in full.
      ["sections", "later", "restarted"],
      ["write", "later", "never ran"],
    ]);
    const refused = await previewResume(demo({ prompt: "other" }), { thread: "preview", store });
    expect(refused.outcome).toBe("refused");
    expect(refused.refusal?.code).toBe("FINGERPRINT_MISMATCH");
    expect(refused.steps[0]).toMatchObject({ step: "plan", action: "reuse", reason: "stale" });

    // The preview's promise holds: the resume runs exactly the one failed item, then the rest.
    const ran: string[] = [];
    await resume(demo({ ran }), { thread: "preview", store });
    expect(ran).toEqual(["sections[2]", "write"]);
  });
});

// -------------------------------------------------------------------------------------------------
// State schema migrations

describe("state schema on resume", () => {
  let store: OpenedStore;
  beforeAll(async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-migrate-"));
    dirs.push(dir);
    store = await openStore(`file:${dir}`);
  });
  afterAll(() => store.close());

  const V1 = z.object({ topic: z.string(), words: z.number().optional(), summary: z.string().optional() });
  const V2 = z.object({ topic: z.string(), words: z.object({ value: z.number() }).optional(), summary: z.string().optional() });
  const v1 = (fail: boolean) =>
    workflow("migrating", { state: V1, defaultInput: { topic: "tides" }, version: "1" })
      .step("count", async (s) => ({ words: s.topic.length }))
      .step("summarize", async (s) => {
        if (fail) throw new Error("summary failed");
        return { summary: `${s.topic}: ${s.words}` };
      }, { retry: false });
  const v2 = (migrate?: (old: Record<string, unknown>, from: { version: string | undefined }) => Record<string, unknown>) =>
    workflow("migrating", { state: V2, defaultInput: { topic: "tides" }, version: "2", migrate })
      .step("count", async (s) => ({ words: { value: s.topic.length } }))
      .step("summarize", async (s) => ({ summary: `${s.topic}: ${s.words?.value}` }));

  it("names the fields that no longer parse, writes nothing, and refuses", async () => {
    expectCode(await rejection(run(v1(true), { thread: "schema", store })), "STEP_FAILED");
    const before = (await readHistory(store.saver, "schema")).length;
    // The version changed too: --force gets past the fingerprint, the schema check still holds.
    const error = await rejection(resume(v2(), { thread: "schema", store, force: true }));
    expectCode(error, "STATE_SCHEMA_MISMATCH");
    expect(error.message).toContain(`state schema of workflow "migrating" (saved under version 1, the workflow is now at version 2)`);
    expect(error.message).toContain("migrate:");
    expect(error.message).toContain("→ at words");
    expect(error.details.fields).toEqual(["words"]);
    expect((await readHistory(store.saver, "schema")).length).toBe(before);
  });

  it("migrates with the workflow's migrate function, then continues without rerunning finished steps", async () => {
    expectCode(await rejection(run(v1(true), { thread: "migrated", store })), "STEP_FAILED");
    const seen: { version: string | undefined }[] = [];
    const notices: string[] = [];
    const result = await resume(
      v2((old, from) => {
        seen.push(from);
        return { ...old, words: typeof old.words === "number" ? { value: old.words } : old.words };
      }),
      { thread: "migrated", store, force: true, onStart: (i) => notices.push(...i.notices) },
    );
    expect(seen).toEqual([{ version: "1" }]);
    expect(result.state).toEqual({ topic: "tides", words: { value: 5 }, summary: "tides: 5" });
    expect(result.tasksRun).toBe(1);
    expect(notices.join("\n")).toContain("migrated the saved state from version 1 to 2 (fields: words)");
    const steps = (await readHistory(store.saver, "migrated")).map((e) => e.step);
    expect(steps).toContain("migrate");
  });

  it("refuses a migrate function whose result still does not parse", async () => {
    expectCode(await rejection(run(v1(true), { thread: "bad-migrate", store })), "STEP_FAILED");
    const error = await rejection(resume(v2((old) => ({ ...old, words: "five" })), { thread: "bad-migrate", store, force: true }));
    expectCode(error, "STATE_SCHEMA_MISMATCH");
    expect(error.message).toContain("returned a state that still does not match");
    expect(error.message).toContain("→ at words");
  });
});

// -------------------------------------------------------------------------------------------------
// Plain LangGraph graphs

describe("plain StateGraph fingerprints", () => {
  const S = Annotation.Root({ a: Annotation<string>, b: Annotation<string>, c: Annotation<string> });
  const graph = (extra: boolean, fail: boolean) => {
    const g = new StateGraph(S)
      .addNode("first", async () => ({ a: "1" }))
      .addNode("second", async () => {
        if (fail) throw new Error("second failed");
        return { b: "2" };
      })
      .addEdge(START, "first");
    if (extra) return g.addNode("third", async () => ({ c: "3" })).addEdge("first", "third").addEdge("third", "second").addEdge("second", END);
    return g.addEdge("first", "second").addEdge("second", END);
  };

  it("refuses a thread saved without fingerprints that is due to run a node the graph no longer has", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-plain-drift-"));
    dirs.push(dir);
    const store = await openStore(`file:${dir}`);
    try {
      // Written by LangGraph alone, with cairn's saver: no cairn metadata, no fingerprint.
      const app = graph(false, true).compile({ checkpointer: store.saver });
      await expect(app.invoke({}, { configurable: { thread_id: "drift" } })).rejects.toThrow("second failed");
      const renamed = new StateGraph(S)
        .addNode("first", async () => ({ a: "1" }))
        .addNode("second_v2", async () => ({ b: "2" }))
        .addEdge(START, "first")
        .addEdge("first", "second_v2")
        .addEdge("second_v2", END);
      const error = await rejection(resume(renamed, { thread: "drift", store, force: true }));
      expectCode(error, "FINGERPRINT_MISMATCH");
      expect(error.message).toContain(`due to run "second", which the workflow no longer has`);
      expect(error.message).toContain("--from-step first");
      const history = await readHistory(store.saver, "drift");
      expect(history.at(-1)!.step).not.toMatch(/restart|fork/);
    } finally {
      await store.close();
    }
  });

  it("refuses when the edges changed under finished nodes", async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-plain-fp-"));
    dirs.push(dir);
    const store = await openStore(`file:${dir}`);
    try {
      expectCode(await rejection(run(graph(false, true), { thread: "p", store })), "STEP_FAILED");
      const error = await rejection(resume(graph(true, false), { thread: "p", store }));
      expectCode(error, "FINGERPRINT_MISMATCH");
      expect(error.message).toContain("first");
      const result = await resume(graph(true, false), { thread: "p", store, force: true });
      expect(result.status).toBe("completed");
    } finally {
      await store.close();
    }
  });
});

// -------------------------------------------------------------------------------------------------
// The CLI: an input file edited between a crash and a resume, --dry-run, --force

describe("cairn resume after changes (CLI)", () => {
  it("refuses an edited input file with the ways on, previews with --dry-run, continues with --force", async () => {
    const cwd = await workdir();
    const graph = "test/fixtures/changing-graph.ts";
    await writeFile(join(cwd, "story.yaml"), "topic: honesty\nsections: 3\n");
    const failed = await cairn(cwd, ["run", graph, "--thread", "t1", "--input", "@story.yaml"], { FAIL_STEP: "write" });
    expect(failed.code).toBe(1);

    const preview = await cairn(cwd, ["resume", graph, "--thread", "t1", "--dry-run"]);
    expect(preview.code).toBe(0);
    expect(preview.stdout).toMatch(/write\s+run\s+failed/);
    expect(preview.stdout).toMatch(/plan\s+reuse/);
    expect(preview.stdout).toContain("nothing was run or written");

    const stale = await cairn(cwd, ["resume", graph, "--thread", "t1"], { PLAN_PROMPT: "Plan in three acts: {topic}" });
    expect(stale.code).toBe(2);
    expect(stale.stderr).toContain(`step "plan" is stale`);
    expect(stale.stderr).toContain(`cairn resume ${graph} --thread t1 --from-step plan`);

    await writeFile(join(cwd, "story.yaml"), "topic: courage\nsections: 3\n");
    const refused = await cairn(cwd, ["resume", graph, "--thread", "t1"]);
    expect(refused.code).toBe(2);
    expect(refused.stderr).toContain(`input field "topic" changed`);
    expect(refused.stderr).toContain(`cairn resume ${graph} --thread t1 --force`);
    expect(refused.stderr).toContain(`--input @${join(cwd, "story.yaml")} --thread <new-id>`);

    const previewRefused = await cairn(cwd, ["resume", graph, "--thread", "t1", "--dry-run", "--json"]);
    expect(previewRefused.code).toBe(2);
    expect(JSON.parse(previewRefused.stdout)).toMatchObject({ outcome: "refused", refusal: { code: "FINGERPRINT_MISMATCH" } });

    const forced = await cairn(cwd, ["resume", graph, "--thread", "t1", "--force"]);
    expect(forced.code).toBe(0);
    expect(forced.stderr).toContain("note: resuming with --force");
    expect(await readFile(join(cwd, "story.yaml"), "utf8")).toContain("courage");
  }, 300_000);
});

// -------------------------------------------------------------------------------------------------
// Loops, fan-outs and schema changes under migration

describe("changes to loops, fan-outs and completed threads", () => {
  let store: OpenedStore;
  beforeAll(async () => {
    const dir = await mkdtemp(join(tmpdir(), "cairn-safety-more-"));
    dirs.push(dir);
    store = await openStore(`file:${dir}`);
  });
  afterAll(() => store.close());

  const Book = z.object({ n: z.number().default(4), chapters: appendList(z.string()), tone: z.string().optional() });
  const book = (prompt: string, failAt?: number) =>
    workflow("loop-book", { state: Book, defaultInput: {} })
      .step(
        "write",
        async (s) => {
          if (failAt !== undefined && s.chapters.length === failAt) throw new Error(`chapter ${failAt + 1} failed`);
          return { chapters: [`ch${s.chapters.length + 1} (${prompt})`] };
        },
        { fingerprint: { prompt }, retry: false },
      )
      .route("write", (s) => (s.chapters.length < s.n ? "write" : "end"), { targets: ["write", "end"] });

  it("a loop step due again is checked too: its earlier passes are stale when its fingerprint changed", async () => {
    expectCode(await rejection(run(book("v1", 2), { thread: "loop", store })), "STEP_FAILED");
    const error = await rejection(resume(book("v2"), { thread: "loop", store }));
    expectCode(error, "FINGERPRINT_MISMATCH");
    expect(error.details.stale).toEqual(["write"]);
    expect(error.details.fromStep).toBe("write");
    const result = await resume(book("v2"), { thread: "loop", store, fromStep: "write" });
    expect(result.state.chapters).toEqual(["ch1 (v2)", "ch2 (v2)", "ch3 (v2)", "ch4 (v2)"]);
  });

  it("a step appended after a thread completed runs on a plain resume", async () => {
    await run(demo(), { thread: "appended-late", store });
    const notices: string[] = [];
    const ran: string[] = [];
    const result = await resume(demo({ append: true, ran }), { thread: "appended-late", store, onStart: (i) => notices.push(...i.notices) });
    expect(result.status).toBe("completed");
    expect(ran).toEqual(["polish"]);
    expect(result.state.extra).toMatch(/!$/);
    expect(notices.join("\n")).toContain(`the workflow now goes on after "write": polish will run`);
    // A loop whose route ends the workflow stays completed: the new step is not on its path.
    await run(book("v1"), { thread: "route-ends", store });
    const longer = book("v1").step("blurb", async (s) => ({ tone: `a book of ${s.chapters.length} chapters` }));
    expect((await resume(longer, { thread: "route-ends", store })).status).toBe("already-completed");
  });

  const Parts = z.object({ parts: appendList(z.string()), label: z.string().optional() });
  const PartsV2 = z.object({ parts: appendList(z.string()), label: z.object({ text: z.string() }).optional(), style: z.string().default("plain") });
  it("a migration inside a fan-out reruns the saved items once each, never twice", async () => {
    const v1 = workflow("parts", { state: Parts, version: "1" })
      .step("name", async () => ({ label: "parts" }))
      .map("make", { over: () => [0, 1, 2, 3], run: async (i: number) => { if (i === 2) throw new Error("item 2 failed"); return `p${i}`; }, into: "parts", retry: false });
    expectCode(await rejection(run(v1, { thread: "migrate-fanout", store })), "STEP_FAILED");
    const v2 = workflow("parts", { state: PartsV2, version: "2", migrate: (old) => ({ ...old, label: { text: String(old.label) } }) })
      .step("name", async () => ({ label: { text: "parts" } }))
      .map("make", { over: () => [0, 1, 2, 3], run: async (i: number) => `p${i}`, into: "parts" });
    const result = await resume(v2, { thread: "migrate-fanout", store, force: true });
    expect(result.state).toEqual({ parts: ["p0", "p1", "p2", "p3"], label: { text: "parts" }, style: "plain" });
  });

  it("a field the schema now defaults is filled in, and is not mistaken for a changed input", async () => {
    const V1 = z.object({ topic: z.string().default("tides"), out: z.string().optional() });
    const V2 = V1.extend({ tone: z.string().default("plain") });
    const first = (fail: boolean) =>
      workflow("defaults", { state: V1 }).step("a", async () => ({})).step("b", async (s) => {
        if (fail) throw new Error("b failed");
        return { out: s.topic };
      }, { retry: false });
    expectCode(await rejection(run(first(true), { thread: "defaults", store })), "STEP_FAILED");
    const second = workflow("defaults", { state: V2 }).step("a", async () => ({})).step("b", async (s) => ({ out: `${s.topic}, ${s.tone}` }));
    const notices: string[] = [];
    const result = await resume(second, { thread: "defaults", store, onStart: (i) => notices.push(...i.notices) });
    expect(result.state).toEqual({ topic: "tides", tone: "plain", out: "tides, plain" });
    expect(notices.join("\n")).toContain("filled in fields the schema now gives defaults (fields: tone)");
    expect(notices.join("\n")).not.toContain("input");
  });
});
