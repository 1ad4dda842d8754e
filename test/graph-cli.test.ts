/**
 * `cairn graph` as a user runs it (test/helpers/cli.ts): Mermaid text on stdout that passes the strict
 * flowchart parser (test/helpers/mermaid.ts), steps marked for threads in a file store and a SQLite store
 * (completed, failed in a middle step, failed and stopped part-way through a fan-out, a plain LangGraph
 * graph), `--json`, and bad input (exit 2, nothing written).
 */
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { cairn, removeWorkdirs, spawnCairn, waitForOutput, workdir } from "./helpers/cli.ts";
import { classOf, edgeList, nodeNamed, parseFlowchart } from "./helpers/mermaid.ts";

afterAll(removeWorkdirs);

const MORAL_VIDEO = "graphs/moral-video.ts";
const SHAPES = "test/fixtures/shapes-graph.ts";
const PIPELINE = "test/fixtures/pipeline-graph.ts";
const PLAIN = "test/fixtures/plain-graph.ts";

interface GraphJson {
  mermaid: string;
  thread: { id: string; status: string } | null;
  steps: { name: string; kind: string; status: string | null; items?: { done: number; total: number } }[];
}

/** Each step node's class (its status) in a printed diagram. */
function drawn(stdout: string, steps: string[]): string[] {
  const chart = parseFlowchart(stdout.trimEnd());
  return steps.map((s) => `${s}: ${classOf(chart, nodeNamed(chart, s).id)}`);
}

const listed = (json: GraphJson) => json.steps.map((s) => `${s.name}: ${s.status}${s.items ? ` ${s.items.done}/${s.items.total}` : ""}`);

describe("cairn graph <graph.ts>", () => {
  it("prints the example novel workflow as a Mermaid flowchart: its loop, its fan-out, start and end", async () => {
    const cwd = await workdir();
    const r = await cairn(cwd, ["graph", "graphs/novel.ts"]);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toBe("");
    const chart = parseFlowchart(r.stdout.trimEnd());
    expect(edgeList(chart)).toEqual([
      "start --> interpret_brief",
      "interpret_brief --> build_world",
      "build_world --> create_characters",
      "create_characters --> outline_plot",
      "outline_plot --> plan_chapters",
      "plan_chapters --> write_chapter",
      "write_chapter --> write_chapter [loop]",
      "write_chapter --> edit_chapters",
      "edit_chapters --> continuity_check",
      "continuity_check --> write_blurb",
      "write_blurb --> assemble_book",
      "assemble_book --> end",
    ]);
    expect(nodeNamed(chart, "edit_chapters")).toMatchObject({ shape: "subroutine", label: "edit_chapters\n× items → edited" });
    // No thread: nothing is coloured, and no store was opened.
    expect(chart.classes.size).toBe(0);
    expect(await readdir(cwd)).toEqual(["graphs", "test"]);
  });

  it("draws the example graphs' loops from their declared route targets", async () => {
    const cwd = await workdir();
    const [sheet, planner] = await Promise.all([cairn(cwd, ["graph", "graphs/spritesheet.ts"]), cairn(cwd, ["graph", "graphs/planner.ts"])]);
    expect(edgeList(parseFlowchart(sheet.stdout.trimEnd()))).toEqual([
      "start --> load_config",
      "load_config --> generate_rows",
      "generate_rows --> gate",
      "gate --> generate_rows [loop]",
      "gate --> assemble_sheet",
      "assemble_sheet --> end",
    ]);
    expect(edgeList(parseFlowchart(planner.stdout.trimEnd()))).toEqual([
      "start --> plan",
      "plan --> execute",
      "execute --> record",
      "record --> execute [loop]",
      "record --> summarize",
      "summarize --> end",
    ]);
  });

  it("--help prints the usage", async () => {
    const cwd = await workdir();
    const r = await cairn(cwd, ["graph", "--help"]);
    expect(r.code).toBe(0);
    expect(r.stdout.split("\n")[0]).toBe("cairn graph <graph.ts> [--thread <id>] [--store <uri>] [--json]");
  });
});

describe("cairn graph --thread on a file store", () => {
  const STEPS = ["context_analyzer", "web_researcher", "story_generator", "script_segmenter", "character_designer", "video_assembler"];

  it("marks a thread that failed in a middle step, then the same thread once resumed to the end", async () => {
    const cwd = await workdir();
    const store = `file:${join(cwd, "store")}`;
    const failed = await cairn(cwd, ["run", MORAL_VIDEO, "--thread", "video-1", "--input", '{"delayMs":0,"failOnceAt":"story_generator"}', "--store", store]);
    expect(failed.code, failed.stderr).toBe(1);

    const text = await cairn(cwd, ["graph", MORAL_VIDEO, "--thread", "video-1", "--store", store]);
    expect(text.code, text.stderr).toBe(0);
    expect(drawn(text.stdout, STEPS)).toEqual([
      "context_analyzer: done",
      "web_researcher: done",
      "story_generator: failed",
      "script_segmenter: pending",
      "character_designer: pending",
      "video_assembler: pending",
    ]);
    expect(parseFlowchart(text.stdout.trimEnd()).subgraphs[0]!.title).toBe("thread video-1 · failed");

    const json = await cairn(cwd, ["graph", MORAL_VIDEO, "--thread", "video-1", "--store", store, "--json"]);
    expect(json.code, json.stderr).toBe(0);
    const parsed = JSON.parse(json.stdout) as GraphJson;
    expect(parsed.mermaid).toBe(text.stdout.trimEnd());
    expect(parsed.thread).toEqual({ id: "video-1", status: "failed" });
    expect(parsed.steps).toEqual([
      { name: "context_analyzer", kind: "step", status: "done" },
      { name: "web_researcher", kind: "step", status: "done" },
      { name: "story_generator", kind: "step", status: "failed" },
      { name: "script_segmenter", kind: "step", status: "pending" },
      { name: "character_designer", kind: "map", status: "pending" },
      { name: "video_assembler", kind: "step", status: "pending" },
    ]);

    const resumed = await cairn(cwd, ["resume", MORAL_VIDEO, "--thread", "video-1", "--store", store]);
    expect(resumed.code, resumed.stderr).toBe(0);
    const after = await cairn(cwd, ["graph", MORAL_VIDEO, "--thread", "video-1", "--store", store]);
    expect(drawn(after.stdout, STEPS)).toEqual(STEPS.map((s) => `${s}: done`));
  });

  it("shows a fan-out stopped by Ctrl+C as pending with its saved items, on an interrupted thread", async () => {
    const cwd = await workdir();
    const store = `file:${join(cwd, "store")}`;
    const { child, done } = spawnCairn(cwd, ["run", PIPELINE, "--thread", "frames", "--input", '{"frames":8,"delayMs":300}', "--store", store]);
    await waitForOutput(child, /frame \d+ saved/);
    child.kill("SIGINT");
    expect((await done).code).toBe(130);

    const r = await cairn(cwd, ["graph", PIPELINE, "--thread", "frames", "--store", store, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const parsed = JSON.parse(r.stdout) as GraphJson;
    expect(parsed.thread).toEqual({ id: "frames", status: "interrupted" });
    const [plan, render, assemble] = parsed.steps;
    expect(plan).toEqual({ name: "plan", kind: "step", status: "done" });
    expect(render).toMatchObject({ name: "render", kind: "map", status: "pending", items: { total: 8 } });
    // The frames running at Ctrl+C finished and were saved; the rest never started.
    const saved = render!.items!.done;
    expect(saved).toBeGreaterThanOrEqual(1);
    expect(saved).toBeLessThan(8);
    expect(assemble).toEqual({ name: "assemble", kind: "step", status: "pending" });
    const chart = parseFlowchart(parsed.mermaid);
    expect(nodeNamed(chart, "render").label).toBe(`render\n× items → rendered\n${saved}/8 items`);
    expect(classOf(chart, nodeNamed(chart, "render").id)).toBe("pending");
  });

  it("marks a plain LangGraph graph's nodes by name", async () => {
    const cwd = await workdir();
    const store = `file:${join(cwd, "store")}`;
    const env = { FAIL_ONCE_FILE: join(cwd, "write_draft.failed") };
    const failed = await cairn(cwd, ["run", PLAIN, "--thread", "plain-1", "--input", '{"topic":"tides"}', "--store", store], env);
    expect(failed.code, failed.stderr).toBe(1);
    const r = await cairn(cwd, ["graph", PLAIN, "--thread", "plain-1", "--store", store]);
    expect(r.code, r.stderr).toBe(0);
    expect(drawn(r.stdout, ["make_outline", "write_draft", "polish"])).toEqual(["make_outline: done", "write_draft: failed", "polish: pending"]);
  });
});

describe("cairn graph --thread on a SQLite store", () => {
  it("marks a fan-out whose item failed, with the items saved, and a completed thread", async () => {
    const cwd = await workdir();
    const store = `sqlite:${join(cwd, "cairn.db")}`;
    const failed = await cairn(cwd, ["run", SHAPES, "--thread", "items", "--input", '{"illustrations":5,"failItem":3}', "--store", store]);
    expect(failed.code, failed.stderr).toBe(1);
    const r = await cairn(cwd, ["graph", SHAPES, "--thread", "items", "--store", store, "--json"]);
    expect(r.code, r.stderr).toBe(0);
    const parsed = JSON.parse(r.stdout) as GraphJson;
    expect(listed(parsed)).toEqual(["plan: done", "draft-chapter: done", "illustrate: failed 4/5", "review: pending", "polish: pending", "publish: pending"]);
    expect(nodeNamed(parseFlowchart(parsed.mermaid), "illustrate").label).toBe("illustrate\n× items → pictures\n4/5 items");

    expect((await cairn(cwd, ["run", SHAPES, "--thread", "whole", "--input", '{"wantReview":true}', "--store", store])).code).toBe(0);
    const whole = JSON.parse((await cairn(cwd, ["graph", SHAPES, "--thread", "whole", "--store", store, "--json"])).stdout) as GraphJson;
    expect(listed(whole)).toEqual(["plan: done", "draft-chapter: done", "illustrate: done", "review: done", "polish: done", "publish: done"]);
  });
});

describe("cairn graph: bad input (exit 2, nothing written), and a thread that does not fit", () => {
  it.each([
    { name: "no graph file", args: ["graph"], says: "cairn: cairn graph needs a graph file (e.g. graphs/novel.ts). See: cairn graph --help" },
    { name: "two graph files", args: ["graph", SHAPES, PLAIN], says: `cairn: cairn graph takes one a graph file (e.g. graphs/novel.ts), got 2: ${SHAPES} ${PLAIN}. See: cairn graph --help` },
    { name: "a missing graph file", args: ["graph", "graphs/nope.ts"], says: 'cairn: Graph file "graphs/nope.ts" does not exist' },
    { name: "an unknown option", args: ["graph", SHAPES, "--bogus"], says: "cairn: Unknown option '--bogus'. See: cairn graph --help" },
    { name: "an empty --thread", args: ["graph", SHAPES, "--thread", ""], says: "cairn: --thread is empty. Pass a thread id from: cairn threads" },
  ])("$name", async ({ args, says }) => {
    const cwd = await workdir();
    const r = await cairn(cwd, args);
    expect(r.code, r.stderr).toBe(2);
    expect(r.stdout).toBe("");
    expect(r.stderr.startsWith(says), r.stderr).toBe(true);
    expect(await readdir(cwd)).toEqual(["graphs", "test"]);
  });

  it("an unknown thread: THREAD_NOT_FOUND naming the store and how to list its threads; a thread of another workflow: a warning", async () => {
    const cwd = await workdir();
    const store = `file:${join(cwd, "store")}`;
    expect((await cairn(cwd, ["run", SHAPES, "--thread", "exists", "--store", store])).code).toBe(0);
    const r = await cairn(cwd, ["graph", SHAPES, "--thread", "nope", "--store", store]);
    expect(r.code).toBe(2);
    expect(r.stdout).toBe("");
    expect(r.stderr.trim()).toBe(`cairn: No thread "nope" in store ${store}. List the threads with: cairn threads --store ${store}`);

    const other = await cairn(cwd, ["graph", MORAL_VIDEO, "--thread", "exists", "--store", store]);
    expect(other.code).toBe(0);
    expect(other.stderr.trim()).toBe(`cairn: warning: thread exists was run by workflow "shapes", not the one in ${MORAL_VIDEO}; its steps may not match these.`);
    expect(parseFlowchart(other.stdout.trimEnd()).subgraphs[0]!.title).toBe("thread exists · completed");
  });
});
