/**
 * Comparing states through the public API: `diffStates` on plain values (pure), and `diffCheckpoints` /
 * `parseStateRef` on a real file store holding a thread of test/fixtures/diff-graph.ts that was rerun
 * from a step into a second branch.
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { diffCheckpoints, diffStates, openStore, parseStateRef, readHistory, resume, run, stateAt, type ArtifactRef, type OpenedStore, type StateChange } from "cairn";
import story from "./fixtures/diff-graph.ts";
import { expectCode, rejection } from "./helpers/errors.ts";

const ref = (sha: string, name?: string): ArtifactRef => ({ kind: "cairn.artifact", sha256: sha.repeat(64).slice(0, 64), size: 10, mediaType: "image/png", ...(name ? { name } : {}) });

/** The changes without `segments`, for shorter expectations (segments are checked on their own). */
const brief = (changes: StateChange[]) => changes.map(({ segments: _, ...rest }) => rest);

describe("diffStates", () => {
  it("equal states, whatever the key order, give no changes", () => {
    const a = { title: "Dusk", meta: { a: 1, b: [1, { c: 2 }] }, image: ref("a", "x.png") };
    const b = { image: { name: "x.png", mediaType: "image/png", size: 10, sha256: "a".repeat(64), kind: "cairn.artifact" }, meta: { b: [1, { c: 2 }], a: 1 }, title: "Dusk" };
    expect(diffStates(a, b)).toEqual([]);
    expect(diffStates({}, {})).toEqual([]);
  });

  it("leaves cairn's and LangGraph's channels out, and treats undefined as absent", () => {
    const a = { topic: "x", __cairn_done: ["write"], "branch:to:write": null, notes: undefined };
    const b = { topic: "x", __cairn_done: ["write", "illustrate"], "branch:to:illustrate": null, __cairn_usage: { usd: 1 } };
    expect(diffStates(a, b)).toEqual([]);
  });

  it("fields added, removed and changed, with full values and segments, fields in code-unit order", () => {
    const changes = diffStates({ title: "Dusk", draft: "one\ntwo\n", gone: 3 }, { title: "Dawn", draft: "one\nthree\n", cover: ref("b", "cover.png") });
    expect(changes).toEqual([
      { path: "cover", segments: ["cover"], kind: "added", after: ref("b", "cover.png") },
      { path: "draft", segments: ["draft"], kind: "changed", before: "one\ntwo\n", after: "one\nthree\n" },
      { path: "gone", segments: ["gone"], kind: "removed", before: 3 },
      { path: "title", segments: ["title"], kind: "changed", before: "Dusk", after: "Dawn" },
    ]);
    // JSON has no `before` for added values and no `after` for removed ones.
    expect(JSON.parse(JSON.stringify(changes[2]))).toEqual({ path: "gone", segments: ["gone"], kind: "removed", before: 3 });
    expect(JSON.parse(JSON.stringify(changes[0]))).not.toHaveProperty("before");
  });

  it("nested objects: changes at the keys that differ, odd keys quoted", () => {
    const a = { stats: { words: 34, scenes: 3, by: { ch1: 10 } }, meta: { "a b": 1, "x.y": true } };
    const b = { stats: { words: 41, scenes: 3, by: { ch1: 10, ch2: 5 } }, meta: { "a b": 2 } };
    expect(diffStates(a, b)).toEqual([
      { path: 'meta["a b"]', segments: ["meta", "a b"], kind: "changed", before: 1, after: 2 },
      { path: 'meta["x.y"]', segments: ["meta", "x.y"], kind: "removed", before: true },
      { path: "stats.words", segments: ["stats", "words"], kind: "changed", before: 34, after: 41 },
      { path: "stats.by.ch2", segments: ["stats", "by", "ch2"], kind: "added", after: 5 },
    ]);
  });

  it("arrays of the same length are compared item by item, into the items", () => {
    const a = { scenes: [{ prompt: "a", n: 1 }, { prompt: "b", n: 2 }, { prompt: "c", n: 3 }] };
    const b = { scenes: [{ prompt: "a", n: 1 }, { prompt: "B", n: 2 }, { prompt: "c", n: 4 }] };
    expect(brief(diffStates(a, b))).toEqual([
      { path: "scenes[1].prompt", kind: "changed", before: "b", after: "B" },
      { path: "scenes[2].n", kind: "changed", before: 3, after: 4 },
    ]);
    expect(diffStates(a, b)[0]!.segments).toEqual(["scenes", 1, "prompt"]);
  });

  it("appended items are each added at their index; items cut from the end are each removed", () => {
    const three = [{ n: 1 }, { n: 2 }, { n: 3 }];
    expect(brief(diffStates({ chapters: three }, { chapters: [...three, { n: 4 }, { n: 5 }] }))).toEqual([
      { path: "chapters[3]", kind: "added", after: { n: 4 } },
      { path: "chapters[4]", kind: "added", after: { n: 5 } },
    ]);
    expect(brief(diffStates({ chapters: three }, { chapters: three.slice(0, 1) }))).toEqual([
      { path: "chapters[1]", kind: "removed", before: { n: 2 } },
      { path: "chapters[2]", kind: "removed", before: { n: 3 } },
    ]);
    expect(brief(diffStates({ chapters: [] }, { chapters: ["x"] }))).toEqual([{ path: "chapters[0]", kind: "added", after: "x" }]);
  });

  it("an item inserted or removed in the middle is just that, not every later item changed", () => {
    const a = { rows: ["r0", "r1", "r2", "r3", "r4"] };
    expect(brief(diffStates(a, { rows: ["r0", "r1", "new", "r2", "r3", "r4"] }))).toEqual([{ path: "rows[2]", kind: "added", after: "new" }]);
    expect(brief(diffStates(a, { rows: ["r0", "r2", "r3", "r4"] }))).toEqual([{ path: "rows[1]", kind: "removed", before: "r1" }]);
    expect(brief(diffStates(a, { rows: ["new", "r0", "r1", "r2", "r3", "r4"] }))).toEqual([{ path: "rows[0]", kind: "added", after: "new" }]);
  });

  it("a length change with items replaced pairs the replaced items and compares inside them", () => {
    const a = { scenes: [{ p: "a" }, { p: "b" }, { p: "c" }] };
    const b = { scenes: [{ p: "a" }, { p: "B" }, { p: "c" }, { p: "d" }] };
    expect(brief(diffStates(a, b))).toEqual([
      { path: "scenes[1].p", kind: "changed", before: "b", after: "B" },
      { path: "scenes[3]", kind: "added", after: { p: "d" } },
    ]);
  });

  it("artifact references are compared whole: a new hash or name is one change of the reference", () => {
    const a = { cover: ref("a", "cover.png"), frames: [{ i: 0, image: ref("c", "f0.png") }, { i: 1, image: ref("d", "f1.png") }] };
    const b = { cover: ref("b", "cover.png"), frames: [{ i: 0, image: ref("c", "f0.png") }, { i: 1, image: ref("d", "frame-1.png") }] };
    expect(brief(diffStates(a, b))).toEqual([
      { path: "cover", kind: "changed", before: ref("a", "cover.png"), after: ref("b", "cover.png") },
      { path: "frames[1].image", kind: "changed", before: ref("d", "f1.png"), after: ref("d", "frame-1.png") },
    ]);
  });

  it("a value that changes type is one change with both values", () => {
    expect(brief(diffStates({ x: [1, 2], y: { a: 1 }, z: null }, { x: "1,2", y: [1], z: 0 }))).toEqual([
      { path: "x", kind: "changed", before: [1, 2], after: "1,2" },
      { path: "y", kind: "changed", before: { a: 1 }, after: [1] },
      { path: "z", kind: "changed", before: null, after: 0 },
    ]);
  });

  it("a long array with every item changed stays item by item", () => {
    const a = { items: Array.from({ length: 2_000 }, (_, i) => ({ i, text: `item ${i}` })) };
    const b = { items: [...a.items.map((x) => ({ ...x, text: `${x.text}!` })), { i: 2_000, text: "new" }] };
    const changes = diffStates(a, b);
    expect(changes).toHaveLength(2_001);
    expect(changes[5]).toEqual({ path: "items[5].text", segments: ["items", 5, "text"], kind: "changed", before: "item 5", after: "item 5!" });
    expect(changes[2_000]).toEqual({ path: "items[2000]", segments: ["items", 2_000], kind: "added", after: { i: 2_000, text: "new" } });
  });
});

// -------------------------------------------------------------------------------------------------

describe("diffCheckpoints and parseStateRef on a file store", () => {
  let dir: string;
  let store: OpenedStore;
  const thread = "story";
  /** The last checkpoint of the first branch (before the rerun) and of the second. */
  let first: string;
  let second: string;

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "cairn-diff-"));
    store = await openStore(`file:${dir}`);
    await run(story, { thread, store });
    const before = await readHistory(store.saver, thread);
    first = before[before.length - 1]!.id;
    process.env.DIFF_VARIANT = "b";
    try {
      await resume(story, { thread, fromStep: "write", store });
    } finally {
      delete process.env.DIFF_VARIANT;
    }
    const after = await readHistory(store.saver, thread);
    second = after[after.length - 1]!.id;
    await run(story, { thread: "user@example.com", store });
  });

  afterAll(async () => {
    await store?.close();
    await rm(dir, { recursive: true, force: true });
  });

  it("two checkpoints of two branches: what the rerun changed", async () => {
    const d = await diffCheckpoints(store.saver, store.uri, { thread, checkpoint: first }, { thread, checkpoint: second });
    expect(d.a).toMatchObject({ thread, checkpoint: first, step: "summarize" });
    expect(d.b).toMatchObject({ thread, checkpoint: second, step: "summarize" });
    expect(d.changes.map((c) => `${c.kind} ${c.path}`).sort()).toEqual(
      ["added notes", "added scenes[3]", "changed draft", "changed scenes[1].image", "changed scenes[1].prompt", "changed stats.scenes", "changed stats.words", "changed title"].sort(),
    );
    const image = d.changes.find((c) => c.path === "scenes[1].image")!;
    expect((image.before as ArtifactRef).name).toBe("the-storm-over-the-rocks.png");
    expect((image.after as ArtifactRef).name).toBe("the-gale-over-the-rocks.png");
  });

  it("before and after a fan-out step: the state before its first checkpoint vs after its gathering", async () => {
    const d = await diffCheckpoints(store.saver, store.uri, { thread, beforeStep: "illustrate" }, { thread, step: "illustrate" });
    const history = await readHistory(store.saver, thread);
    // On the current branch (after the rerun): write, illustrate (items), illustrate (gathered).
    const tail = history.slice(-4);
    expect(tail.map((e) => e.step)).toEqual(["write", "illustrate", "illustrate", "summarize"]);
    expect(d.a.checkpoint).toBe(tail[0]!.id);
    expect(d.b.checkpoint).toBe(tail[2]!.id);
    expect(d.changes.map((c) => `${c.kind} ${c.path}`)).toEqual(["added scenes[0]", "added scenes[1]", "added scenes[2]", "added scenes[3]"]);
  });

  it("the same state twice: no changes", async () => {
    const d = await diffCheckpoints(store.saver, store.uri, { thread }, { thread, checkpoint: second });
    expect(d.changes).toEqual([]);
  });

  it("bad refs are CairnErrors naming the value", async () => {
    const unknownThread = await rejection(diffCheckpoints(store.saver, store.uri, { thread: "nope" }, { thread }));
    expectCode(unknownThread, "THREAD_NOT_FOUND");
    expect(unknownThread.message).toContain(`No thread "nope"`);

    const unknownCheckpoint = await rejection(diffCheckpoints(store.saver, store.uri, { thread, checkpoint: "bogus" }, { thread }));
    expectCode(unknownCheckpoint, "CHECKPOINT_NOT_FOUND");
    expect(unknownCheckpoint.message).toContain(`cairn history ${thread}`);

    for (const at of [{ step: "publish" }, { beforeStep: "publish" }]) {
      const unknownStep = await rejection(diffCheckpoints(store.saver, store.uri, { thread, ...at }, { thread }));
      expectCode(unknownStep, "UNKNOWN_STEP");
      expect(unknownStep.message).toBe(`Step "publish" has no checkpoint in thread "story". Steps with checkpoints: write, illustrate, summarize.`);
    }
    const beforeUnknownThread = await rejection(diffCheckpoints(store.saver, store.uri, { thread: "nope", beforeStep: "write" }, { thread }));
    expectCode(beforeUnknownThread, "THREAD_NOT_FOUND");

    const both = await rejection(diffCheckpoints(store.saver, store.uri, { thread, step: "write", checkpoint: first }, { thread }));
    expectCode(both, "INVALID_ARGUMENT");
    expect(both.message).toContain(`checkpoint "${first}" and step "write"`);
  });

  it("after restarts, each step is still found on the current branch, and before/after a restarted step compare", async () => {
    // A restart writes a checkpoint after the one before the step (as the step that produced it, so the
    // current routing decides what runs next): the earlier steps' checkpoints stay on the branch.
    const t = "restarts";
    await run(story, { thread: t, store });
    await resume(story, { thread: t, fromStep: "illustrate", store });
    await resume(story, { thread: t, fromStep: "summarize", store });
    await resume(story, { thread: t, fromStep: "summarize", store });
    const history = await readHistory(store.saver, t);
    const restarts = history.filter((e) => e.step.startsWith("restart:"));
    expect(restarts.map((e) => e.step)).toEqual(["restart:illustrate", "restart:summarize", "restart:summarize"]);

    const afterWrite = await stateAt(store.saver, store.uri, t, { step: "write" });
    expect(afterWrite.step).toBe("write");
    expect(afterWrite.values.title).toBe("The keeper and the storm: a lighthouse keeper");

    const d = await diffCheckpoints(store.saver, store.uri, { thread: t, beforeStep: "illustrate" }, { thread: t, step: "illustrate" });
    expect(d.a.checkpoint).toBe(restarts[0]!.id);
    expect(d.b.step).toBe("illustrate");
    expect(d.changes.map((c) => `${c.kind} ${c.path}`)).toEqual(["added scenes[0]", "added scenes[1]", "added scenes[2]"]);

    const write = await diffCheckpoints(store.saver, store.uri, { thread: t, beforeStep: "write" }, { thread: t, step: "write" });
    expect(write.a.step).toBe("start");
    expect(write.changes.map((c) => `${c.kind} ${c.path}`)).toEqual(["added draft", "added title"]);
  });

  it("after a resume from a checkpoint (a fork, a copy of it), the step that made the copied state is still found", async () => {
    const t = "forks";
    await run(story, { thread: t, store });
    const first = await readHistory(store.saver, t);
    const afterWrite = first.find((e) => e.step === "write")!;
    await resume(story, { thread: t, checkpoint: afterWrite.id, store });
    const forks = (await readHistory(store.saver, t)).filter((e) => e.source === "fork");
    expect(forks).toHaveLength(1);
    const found = await stateAt(store.saver, store.uri, t, { step: "write" });
    expect(found.checkpoint).toBe(forks[0]!.id);
    expect(found.values.title).toBe("The keeper and the storm: a lighthouse keeper");
  });

  it("parseStateRef: <thread>, <thread>@<checkpoint>, and thread ids that contain @", async () => {
    expect(await parseStateRef(store.saver, thread)).toEqual({ thread });
    expect(await parseStateRef(store.saver, `${thread}@${first}`)).toEqual({ thread, checkpoint: first });
    // A thread id with an "@" is that thread, not a checkpoint "example.com" of thread "user".
    expect(await parseStateRef(store.saver, "user@example.com")).toEqual({ thread: "user@example.com" });
    const history = await readHistory(store.saver, "user@example.com");
    const id = history[0]!.id;
    expect(await parseStateRef(store.saver, `user@example.com@${id}`)).toEqual({ thread: "user@example.com", checkpoint: id });
    const empty = await rejection(parseStateRef(store.saver, `${thread}@`));
    expectCode(empty, "INVALID_ARGUMENT");
    expect(empty.message).toContain(`Write ${thread}@<checkpoint-id>`);
  });

  it("parseStateRef refuses a text that is both a thread and a checkpoint of another thread, saying how to write each", async () => {
    const twin = `${thread}@${first}`;
    await run(story, { thread: twin, store });
    const error = await rejection(parseStateRef(store.saver, twin));
    expectCode(error, "INVALID_ARGUMENT");
    expect(error.message).toBe(
      `"${twin}" is ambiguous: it is the id of a thread, and also checkpoint "${first}" of thread "${thread}". ` +
        `For the thread "${twin}", name one of its checkpoints: "${twin}@<checkpoint-id>" (ids from: cairn history '${twin}'); ` +
        `for the checkpoint, compare it within its thread: cairn diff '${thread}' ${first} <other-checkpoint-id>.`,
    );
  });
});
