/**
 * `workflowDiagram` and `threadSteps` through the public API: the Mermaid text for every shape a workflow
 * can take, checked by a strict parser of Mermaid's flowchart grammar (test/helpers/mermaid.ts), and each
 * step's status on real threads in real stores (file, SQLite, Postgres) after a completed run, a failure
 * in a middle step, and a fan-out stopped or failed part-way.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Annotation, END, START, StateGraph } from "@langchain/langgraph";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { graphSteps, openStore, resume, run, threadSteps, workflow, workflowDiagram, type OpenedStore, type RunTarget, type ThreadSteps } from "../src/index.ts";
import shapes from "./fixtures/shapes-graph.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { classOf, edgeList, nodeNamed, parseFlowchart } from "./helpers/mermaid.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), "cairn-graph-"));
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** Each step's status (and items when shown), as `name: status [done/total]`. */
const statuses = (marks: ThreadSteps) => marks.steps.map((s) => `${s.name}: ${s.status}${s.items ? ` ${s.items.done}/${s.items.total}` : ""}`);

/** The class (status colour) of each step node in a diagram. */
function drawnStatuses(text: string, steps: string[]): string[] {
  const chart = parseFlowchart(text);
  return steps.map((s) => `${s}: ${classOf(chart, nodeNamed(chart, s).id)}`);
}

async function marksOf(target: RunTarget, store: OpenedStore, thread: string): Promise<ThreadSteps> {
  return threadSteps(target, store.saver, thread, store.uri);
}

describe("workflowDiagram", () => {
  it("draws a fan-out, a loop, a conditional step's skip path, declared, inferred and unknown routes, as valid Mermaid", () => {
    const text = workflowDiagram(shapes);
    expect(text).toMatchInlineSnapshot(`
      "flowchart TD
        START(["start"])
        s_plan["plan"]
        s_draft_chapter["draft-chapter"]
        s_illustrate[["illustrate<br/>× items → pictures"]]
        s_review["review<br/>(when)"]
        s_polish["polish"]
        s_publish["publish"]
        END(["end"])
        q_publish{{"?"}}
        note_publish>"route after publish: targets unknown. Declare them: .route(#34;publish#34;, fn, { targets: [ … ] })"]
        START --> s_plan
        s_plan --> s_draft_chapter
        s_draft_chapter -->|"loop"| s_draft_chapter
        s_draft_chapter --> s_illustrate
        s_illustrate --> s_review
        s_illustrate -.->|"skip review"| s_polish
        s_review --> s_polish
        s_polish --> s_publish
        s_polish --> END
        s_publish -.->|"route"| q_publish
        q_publish -.- note_publish
        classDef note fill:#fffbe6,stroke:#d4b106,color:#5c4a00
        class note_publish note"
    `);
    const chart = parseFlowchart(text);
    expect(chart.direction).toBe("TD");
    // The fan-out's gather node is internal: never drawn.
    expect([...chart.nodes.values()].map((n) => n.label.split("\n")[0])).toEqual(["start", "plan", "draft-chapter", "illustrate", "review", "polish", "publish", "end", "?", expect.stringContaining("targets unknown")]);
    expect(nodeNamed(chart, "illustrate").shape).toBe("subroutine");
    expect(nodeNamed(chart, "draft-chapter")).toMatchObject({ id: "s_draft_chapter", shape: "rect" });
    expect(nodeNamed(chart, "?").shape).toBe("hexagon");
    expect(chart.nodes.get("note_publish")!.label).toBe('route after publish: targets unknown. Declare them: .route("publish", fn, { targets: [ … ] })');
    expect(edgeList(chart)).toEqual([
      "start --> plan",
      "plan --> draft-chapter",
      "draft-chapter --> draft-chapter [loop]",
      "draft-chapter --> illustrate",
      "illustrate --> review",
      "illustrate -.-> polish [skip review]",
      "review --> polish",
      "polish --> publish",
      "polish --> end",
      "publish -.-> ? [route]",
      expect.stringMatching(/^\? -\.- route after publish/),
    ]);
    // The route targets as describe() gives them: declared, inferred from the source, unknown.
    expect(shapes.describe().routes.map((r) => `${r.from}: ${r.targetsFrom} ${r.targets.join(",")}`)).toEqual([
      "draft-chapter: declared draft-chapter,illustrate",
      "polish: inferred publish,end",
      "publish: unknown ",
    ]);
  });

  it("draws the path past a chain of conditional steps, a skipped step's route, and a loop back to a conditional step", () => {
    const State = z.object({ a: z.boolean().default(true), n: z.number().default(0) });
    const wf = workflow("conditional-chain", { state: State })
      .step("first", () => ({}))
      .step("maybe-a", () => ({}), { when: (s) => s.a })
      .step("maybe-b", () => ({}), { when: (s) => !s.a })
      .step("middle", () => ({ n: 1 }))
      .step("maybe-c", () => ({}), { when: (s) => s.n > 5 })
      .step("last", () => ({}))
      .route("maybe-c", (s) => (s.n > 10 ? "end" : "last"))
      .route("last", (s) => (s.n < 3 ? "maybe-c" : "end"), { targets: ["maybe-c", "end"] });
    const chart = parseFlowchart(workflowDiagram(wf));
    expect(edgeList(chart)).toEqual([
      "start --> first",
      "first --> maybe-a",
      "first -.-> maybe-b [skip maybe-a]",
      "first -.-> middle [skip maybe-a, maybe-b]",
      "maybe-a --> maybe-b",
      "maybe-a -.-> middle [skip maybe-b]",
      "maybe-b --> middle",
      "middle --> maybe-c",
      // A skipped step with a route goes where the route leads.
      "middle -.-> end [skip maybe-c]",
      "middle -.-> last [skip maybe-c]",
      "maybe-c --> end",
      "maybe-c --> last",
      "last --> maybe-c [loop]",
      "last -.-> end [skip maybe-c]",
      "last -.-> last [skip maybe-c]",
      "last --> end",
    ]);
  });

  it("gives step names with '-' (or that would clash once made ids) their own ids and keeps the names in quoted labels", () => {
    const State = z.object({ x: z.number().default(0) });
    const wf = workflow("names", { state: State })
      .step("end", () => ({}))
      .step("a-b", () => ({}))
      .step("a_b", () => ({}))
      .step("style-x", () => ({}))
      .step("a--b", () => ({}));
    const text = workflowDiagram(wf);
    const chart = parseFlowchart(text);
    expect(["end", "a-b", "a_b", "style-x", "a--b"].map((n) => nodeNamed(chart, n).id)).toEqual(["s_end", "s_a_b", "s_a_b_2", "s_style_x", "s_a__b"]);
    expect(edgeList(chart)).toEqual(["start --> end", "end --> a-b", "a-b --> a_b", "a_b --> style-x", "style-x --> a--b", "a--b --> end"]);
    // The last edge goes to the end node, not to the step named "end".
    expect(chart.edges.at(-1)).toMatchObject({ from: "s_a__b", to: "END" });
  });

  it("writes a thread id that holds Mermaid syntax into the legend so that Mermaid reads it as text", () => {
    const thread = 'style:#1; direction LR "q" <b> end';
    const marks: ThreadSteps = { thread, status: "running", steps: graphSteps(shapes).map((s) => ({ ...s, status: "pending" })) };
    const chart = parseFlowchart(workflowDiagram(shapes, marks));
    expect(chart.subgraphs.map((g) => g.title)).toEqual([`thread ${thread} · running`]);
    expect(chart.styles.get("legend")).toBe("fill:none,stroke:#d0d5dd");
    // The legend is one line: its entries linked by invisible links.
    expect(chart.edges.filter((e) => e.arrow === "~~~").map((e) => `${e.from}~${e.to}`)).toEqual([
      "legend_done~legend_failed",
      "legend_failed~legend_running",
      "legend_running~legend_pending",
      "legend_pending~legend_skipped",
    ]);
  });

  it("draws a workflow with no steps as start to end", () => {
    expect(edgeList(parseFlowchart(workflowDiagram(workflow("empty", { state: z.object({}) }))))).toEqual(["start --> end"]);
  });

  it("draws a plain StateGraph from its edges, joins and conditional edges, escaping any node name", () => {
    const State = Annotation.Root({ n: Annotation<number> });
    const graph = new StateGraph(State)
      .addNode("fetch", async () => ({ n: 1 }))
      .addNode("parse-json", async () => ({ n: 2 }))
      .addNode("check", async () => ({ n: 3 }))
      .addNode('say "hi" <now> #1 direction LR', async () => ({ n: 4 }))
      .addEdge(START, "fetch")
      .addEdge(START, "parse-json")
      .addEdge(["fetch", "parse-json"], "check")
      .addConditionalEdges("check", (s) => (s.n > 2 ? "again" : "done"), { again: "fetch", done: 'say "hi" <now> #1 direction LR' });
    const text = workflowDiagram(graph);
    const chart = parseFlowchart(text);
    expect(edgeList(chart)).toEqual([
      "start --> fetch",
      "start --> parse-json",
      "fetch --> check",
      "parse-json --> check",
      "check -.-> fetch [again]",
      'check -.-> say "hi" <now> #1 direction LR [done]',
      'say "hi" <now> #1 direction LR --> end',
    ]);
    expect(text).toContain('["say #34;hi#34; #60;now#62; #35;1 d#105;rection LR"]');
    // A compiled graph draws the same.
    expect(workflowDiagram(graph.compile() as unknown as RunTarget)).toBe(text);
    expect(graphSteps(graph)).toEqual(["fetch", "parse-json", "check", 'say "hi" <now> #1 direction LR'].map((name) => ({ name, kind: "step" })));
  });

  it("draws the conditional edges of a plain graph with no path map to every other node and the end", () => {
    const State = Annotation.Root({ n: Annotation<number> });
    const graph = new StateGraph(State)
      .addNode("a", async () => ({ n: 1 }))
      .addNode("b", async () => ({ n: 2 }))
      .addEdge(START, "a")
      .addConditionalEdges("a", (s) => (s.n > 1 ? "b" : END));
    expect(edgeList(parseFlowchart(workflowDiagram(graph)))).toEqual(["start --> a", "a -.-> b", "a -.-> end", "b --> end"]);
  });
});

describe("threadSteps on a file store", () => {
  let store: OpenedStore;
  beforeAll(async () => {
    store = await openStore(`file:${join(dir, "store")}`);
  });
  afterAll(async () => {
    await store.close();
  });
  const STEPS = ["plan", "draft-chapter", "illustrate", "review", "polish", "publish"];

  it("marks every step of a completed run done, and a step whose `when` did not hold skipped", async () => {
    await run(shapes, { thread: "complete", store });
    const marks = await marksOf(shapes, store, "complete");
    expect(marks.status).toBe("completed");
    expect(marks.otherWorkflow).toBeUndefined();
    expect(statuses(marks)).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: skipped", "polish: done", "publish: done"]);
    const text = workflowDiagram(shapes, marks);
    expect(drawnStatuses(text, STEPS)).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: skipped", "polish: done", "publish: done"]);
    const chart = parseFlowchart(text);
    expect(chart.subgraphs).toEqual([
      { id: "legend", title: "thread complete · completed", direction: "LR", nodes: ["legend_done", "legend_failed", "legend_running", "legend_pending", "legend_skipped"] },
    ]);
    for (const status of ["done", "failed", "running", "pending", "skipped"]) {
      expect(chart.classDefs.has(status)).toBe(true);
      expect(classOf(chart, `legend_${status}`)).toBe(status);
    }
    // A finished fan-out shows no item count.
    expect(nodeNamed(chart, "illustrate").label).toBe("illustrate\n× items → pictures");
  });

  it("marks a run that failed in a middle step: done before it, failed at it, pending after it", async () => {
    const error = await rejection(run(shapes, { thread: "fails-at-polish", input: { failAt: "polish" }, store }));
    expectCode(error, "STEP_FAILED");
    const marks = await marksOf(shapes, store, "fails-at-polish");
    expect(marks.status).toBe("failed");
    // The branch went past review (its `when` did not hold) to polish, so review is skipped, not pending.
    expect(statuses(marks)).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: skipped", "polish: failed", "publish: pending"]);
    expect(drawnStatuses(workflowDiagram(shapes, marks), STEPS)).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: skipped", "polish: failed", "publish: pending"]);
  });

  it("marks a step in a loop that failed on its second pass failed, though it finished once", async () => {
    const State = z.object({ n: z.number().default(0) });
    const loop = workflow("loop", { state: State })
      .step("start-here", () => ({}))
      .step("again", (s) => {
        if (s.n === 1) throw new Error("second pass fails");
        return { n: s.n + 1 };
      })
      .step("after", () => ({}))
      .route("again", (s) => (s.n < 3 ? "again" : "after"), { targets: ["again", "after"] });
    expectCode(await rejection(run(loop, { thread: "loop-second-pass", store })), "STEP_FAILED");
    expect(statuses(await marksOf(loop, store, "loop-second-pass"))).toEqual(["start-here: done", "again: failed", "after: pending"]);
  });

  it("shows a fan-out with a failed item as failed, with the items saved so far", async () => {
    expectCode(await rejection(run(shapes, { thread: "item-fails", input: { illustrations: 5, failItem: 3 }, store })), "STEP_FAILED");
    const marks = await marksOf(shapes, store, "item-fails");
    expect(marks.status).toBe("failed");
    expect(statuses(marks)).toEqual(["plan: done", "draft-chapter: done", "illustrate: failed 4/5", "review: pending", "polish: pending", "publish: pending"]);
    const chart = parseFlowchart(workflowDiagram(shapes, marks));
    expect(nodeNamed(chart, "illustrate").label).toBe("illustrate\n× items → pictures\n4/5 items");
    expect(classOf(chart, "s_illustrate")).toBe("failed");
  });

  it("shows a fan-out stopped part-way with its saved items", async () => {
    const drain = new AbortController();
    const State = z.object({ pictures: z.array(z.number()).default([]) });
    const wf = workflow("stopped", { state: State })
      .step("prepare", () => ({}))
      .map("render", {
        over: () => [0, 1, 2, 3, 4, 5, 6, 7],
        // One at a time; the third item asks the run to stop: it and the two before it are saved, nothing new starts.
        concurrency: 1,
        run: (i) => {
          if (i === 2) drain.abort();
          return i * 10;
        },
        into: "pictures",
      })
      .step("assemble", () => ({}));
    const result = await run(wf, { thread: "stopped-mid-fan-out", store, drain: drain.signal });
    expect(result.status).toBe("stopped");
    const marks = await marksOf(wf, store, "stopped-mid-fan-out");
    // The process that wrote the thread (this one) is alive, so the thread reads as running (statusOf);
    // stopped by another process it reads as interrupted and the step as pending (see graph-cli.test.ts).
    expect(marks.status).toBe("running");
    expect(statuses(marks)).toEqual(["prepare: done", "render: running 3/8", "assemble: pending"]);
    const chart = parseFlowchart(workflowDiagram(wf, marks));
    expect(nodeNamed(chart, "render").label).toBe("render\n× items → pictures\n3/8 items");
    expect(classOf(chart, "s_render")).toBe("running");
    expect(chart.subgraphs[0]!.title).toBe("thread stopped-mid-fan-out · running");
  });

  it("marks a plain StateGraph's nodes by name", async () => {
    let fail = true;
    const State = Annotation.Root({ log: Annotation<string[]>({ reducer: (a, b) => a.concat(b), default: () => [] }) });
    const graph = new StateGraph(State)
      .addNode("one", async () => ({ log: ["one"] }))
      .addNode("two", async () => {
        if (fail) throw new Error("two fails");
        return { log: ["two"] };
      })
      .addNode("three", async () => ({ log: ["three"] }))
      .addEdge(START, "one")
      .addEdge("one", "two")
      .addEdge("two", "three")
      .addEdge("three", END);
    expectCode(await rejection(run(graph, { thread: "plain", store })), "STEP_FAILED");
    expect(statuses(await marksOf(graph, store, "plain"))).toEqual(["one: done", "two: failed", "three: pending"]);
    fail = false;
    await resume(graph, { thread: "plain", store });
    const marks = await marksOf(graph, store, "plain");
    expect(statuses(marks)).toEqual(["one: done", "two: done", "three: done"]);
    expect(drawnStatuses(workflowDiagram(graph, marks), ["one", "two", "three"])).toEqual(["one: done", "two: done", "three: done"]);
  });

  it("says when the thread was run by another workflow", async () => {
    const other = workflow("other", { state: z.object({}) }).step("plan", () => ({}));
    const marks = await marksOf(other, store, "complete");
    expect(marks.otherWorkflow).toBe("shapes");
  });

  it("refuses an unknown thread with THREAD_NOT_FOUND naming the store", async () => {
    const error = await rejection(marksOf(shapes, store, "no-such-thread"));
    expectCode(error, "THREAD_NOT_FOUND");
    expect(error.message).toBe(`No thread "no-such-thread" in store ${store.uri}. List the threads with: cairn threads --store ${store.uri}`);
  });
});

/** The same marks on the database stores: what is read (pending writes, done steps) must not depend on the saver. */
function storeSuite(name: string, uri: () => string, cleanup: () => Promise<void> = async () => {}) {
  describe(`threadSteps on ${name}`, () => {
    let store: OpenedStore;
    beforeAll(async () => {
      store = await openStore(uri());
    });
    afterAll(async () => {
      await store.close();
      await cleanup();
    });

    it("marks a completed thread, a failed step and a fan-out with a failed item", async () => {
      await run(shapes, { thread: "complete", store });
      expect(statuses(await marksOf(shapes, store, "complete"))).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: skipped", "polish: done", "publish: done"]);
      await rejection(run(shapes, { thread: "fails", input: { failAt: "polish", wantReview: true }, store }));
      expect(statuses(await marksOf(shapes, store, "fails"))).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: done", "polish: failed", "publish: pending"]);
      await rejection(run(shapes, { thread: "item", input: { illustrations: 4, failItem: 1 }, store }));
      expect(statuses(await marksOf(shapes, store, "item"))).toEqual(["plan: done", "draft-chapter: done", "illustrate: failed 3/4", "review: pending", "polish: pending", "publish: pending"]);
      expectCode(await rejection(marksOf(shapes, store, "missing")), "THREAD_NOT_FOUND");
    });
  });
}

storeSuite("SQLite", () => `sqlite:${join(dir, "graph.db")}`);

const schema = uniqueSchema("cairn_graph");
describe.skipIf(!postgres.ok)("postgres", () => {
  storeSuite("Postgres", () => postgresUri(schema), () => dropSchema(schema));
});
