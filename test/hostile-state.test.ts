import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Annotation, StateGraph } from "@langchain/langgraph";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { openStore, readHistory, resume, run, workflow, type CairnError } from "../src/index.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();

/** Values that come back from every store exactly as they went in (deep equal, same types). */
const ROUND_TRIPS: Record<string, () => unknown> = {
  "a Map with object keys and nested Sets": () => new Map<unknown, unknown>([["a", 1], [{ k: 1 }, new Set([new Map([[1, { x: [2] }]])])]]),
  "a Set": () => new Set([1, "2", { a: [1] }, null]),
  "a RegExp": () => /a+b/gi,
  "undefined in an array and an object": () => ({ list: [1, undefined, 3], obj: { a: undefined, b: 1 } }),
  "strings JSON must escape": () => ["a\u0000b", "\ud800 lone surrogate", "héllo 🌍 \u2028", '"quoted"\n'],
  "numbers at the edges": () => [Number.MAX_SAFE_INTEGER, Number.MIN_VALUE, 0.1 + 0.2, -1e308],
  "the same object twice (not a cycle)": () => {
    const shared = { s: 1 };
    return [shared, shared];
  },
};

class Scene {
  constructor(readonly title: string) {}
}

/** Values refused before the step is saved: the field path and what the value is, as the message says it. */
const REFUSED: Record<string, { make: () => unknown; says: string }> = {
  function: { make: () => ({ scenes: [{}, { render: () => 1 }] }), says: "v.scenes[1].render is a function (render)" },
  symbol: { make: () => ({ tag: Symbol("hero") }), says: "v.tag is a symbol (hero)" },
  "circular reference": {
    make: () => {
      const node: Record<string, unknown> = { name: "root" };
      node.children = [{ parent: node }];
      return node;
    },
    says: "v.children[0].parent is a circular reference",
  },
  BigInt: { make: () => ({ tokens: 12n }), says: "v.tokens is a BigInt (12n)" },
  "Map holding a Date": { make: () => new Map([["cast", { born: new Date(0) }]]), says: 'v.get("cast").born is a Date' },
  "Set holding NaN": { make: () => new Set([1, NaN]), says: "v (item 1 of the Set) is NaN" },
  Date: { make: () => ({ scenes: [{}, {}, {}, { at: new Date(0) }] }), says: "v.scenes[3].at is a Date" },
  NaN: { make: () => ({ score: NaN }), says: "v.score is NaN" },
  Infinity: { make: () => [1, -Infinity], says: "v[1] is -Infinity" },
  Uint8Array: { make: () => ({ image: new Uint8Array([137, 80]) }), says: "v.image is a Uint8Array" },
  Float32Array: { make: () => new Float32Array([1.5]), says: "v is a Float32Array" },
  Buffer: { make: () => ({ audio: Buffer.from("hi") }), says: "v.audio is a Buffer" },
  ArrayBuffer: { make: () => new ArrayBuffer(4), says: "v is a ArrayBuffer" },
  Error: { make: () => ({ last: new TypeError("bad") }), says: "v.last is an Error (TypeError: bad)" },
  "class instance": { make: () => [new Scene("opening")], says: "v[0] is an instance of class Scene" },
  Promise: { make: () => ({ pending: Promise.resolve(1) }), says: "v.pending is a Promise" },
  "serializer look-alike": { make: () => ({ lc: 2, type: "undefined" }), says: "v is an object shaped like a serializer record" },
  "__proto__ key": { make: () => JSON.parse('{"a":{"__proto__":{"x":1}}}') as unknown, says: 'v.a.__proto__ is a key named "__proto__"' },
};

interface StoreCase {
  name: string;
  uri: () => string;
  setup: () => Promise<void>;
  cleanup: () => Promise<void>;
}

function fileLike(name: string, uriOf: (dir: string) => string): StoreCase {
  let dir = "";
  return {
    name,
    uri: () => uriOf(dir),
    setup: async () => {
      dir = await mkdtemp(join(tmpdir(), `cairn-hostile-${name}-`));
    },
    cleanup: () => rm(dir, { recursive: true, force: true }),
  };
}

const schema = uniqueSchema("cairn_hostile");
const STORES: StoreCase[] = [
  fileLike("file", (dir) => `file:${dir}`),
  fileLike("sqlite", (dir) => `sqlite:${join(dir, "x.db")}`),
  { name: "postgres", uri: () => postgresUri(schema), setup: async () => {}, cleanup: () => dropSchema(schema) },
];

/**
 * A three-step workflow whose middle step returns `make()`. The last step fails on its first attempt,
 * so the value it sees on resume is the one read back from the store.
 */
function probe(make: () => unknown, options: { failLast?: boolean } = {}) {
  const seen: { v: unknown; runs: Record<string, number> } = { v: "nothing", runs: { one: 0, make: 0, three: 0 } };
  let failLast = options.failLast ?? true;
  const wf = workflow("hostile", { state: z.object({ v: z.any().optional(), n: z.number().default(0) }) })
    .step("one", () => {
      seen.runs.one! += 1;
      return { n: 1 };
    })
    .step("make", () => {
      seen.runs.make! += 1;
      return { v: make() };
    })
    .step(
      "three",
      (s) => {
        seen.runs.three! += 1;
        seen.v = s.v;
        if (failLast) {
          failLast = false;
          throw new Error("the model API is down");
        }
        return { n: 3 };
      },
      { retry: false },
    );
  return { wf, seen };
}

async function historySteps(uri: string, thread: string): Promise<string[]> {
  const store = await openStore(uri);
  try {
    return (await readHistory(store.saver, thread)).map((h) => h.step);
  } finally {
    await store.close();
  }
}

for (const store of STORES) {
  describe.skipIf(store.name === "postgres" && !postgres.ok)(`hostile state values: ${store.name} store`, () => {
    beforeAll(store.setup);
    afterAll(store.cleanup);

    let n = 0;
    const thread = () => `t${(n += 1)}`;

    it.each(Object.entries(ROUND_TRIPS))("%s round-trips exactly through a resume", async (_kind, make) => {
      const { wf, seen } = probe(make);
      const t = thread();
      const uri = store.uri();
      const failed = await rejection(run(wf, { store: uri, thread: t }));
      expectCode(failed, "STEP_FAILED");
      const done = await resume(wf, { store: uri, thread: t });
      expect(done.status).toBe("completed");
      // Steps before the failure ran once; the resumed step saw the value as it was returned.
      expect(seen.runs).toEqual({ one: 1, make: 1, three: 2 });
      expect(seen.v).toStrictEqual(make());
      expect(done.state.v).toStrictEqual(make());
      const again = await resume(wf, { store: uri, thread: t });
      expect(again.status).toBe("already-completed");
      expect(again.state.v).toStrictEqual(make());
    });

    it("-0 is saved as 0 (the one value JSON changes; still a number)", async () => {
      const { wf, seen } = probe(() => -0);
      const t = thread();
      await rejection(run(wf, { store: store.uri(), thread: t }));
      await resume(wf, { store: store.uri(), thread: t });
      expect(Object.is(seen.v, 0)).toBe(true);
    });

    it.each(Object.entries(REFUSED))("a %s is refused before the step is saved; a fixed step resumes", async (_kind, { make, says }) => {
      let value = make;
      const { wf, seen } = probe(() => value(), { failLast: false });
      const t = thread();
      const uri = store.uri();
      const error = await rejection(run(wf, { store: uri, thread: t }));
      expectCode(error, "STEP_FAILED");
      expect(error.details.step).toBe("make");
      expect(error.message).toContain('Step "make" returned a value the store cannot keep exactly: ');
      expect(error.message).toContain(says);
      expect(error.message).toContain("Instead, ");
      const cause = error.cause as CairnError;
      expectCode(cause, "INVALID_STATE");
      expect(cause.details.path).toBe(says.split(" is ")[0]);
      // Nothing of the step was written: the thread ends at the step before it.
      const steps = await historySteps(uri, t);
      expect(steps.at(-1)).toBe("one");
      expect(steps).not.toContain("make");

      value = () => ({ fixed: true });
      const done = await resume(wf, { store: uri, thread: t });
      expect(done.status).toBe("completed");
      expect(done.state.v).toEqual({ fixed: true });
      expect(seen.runs).toEqual({ one: 1, make: 2, three: 1 });
    });

    it("a fan-out item's result is refused with the item and the field path", async () => {
      let bad = true;
      const wf = workflow("hostile-map", { state: z.object({ shots: z.array(z.number()).default([1, 2, 3]), frames: z.array(z.any()).default([]) }) }).map(
        "render",
        {
          over: (s) => s.shots,
          into: "frames",
          run: (shot, ctx) => ({ shot, at: bad && ctx.index === 2 ? new Date(0) : "2024-01-01" }),
          retry: false,
        },
      );
      const t = thread();
      const error = await rejection(run(wf, { store: store.uri(), thread: t }));
      expectCode(error, "STEP_FAILED");
      expect(error.message).toContain('Item 2 of step "render" returned a value the store cannot keep exactly: frames[2].at is a Date');
      bad = false;
      const done = await resume(wf, { store: store.uri(), thread: t });
      expect(done.state.frames).toEqual([1, 2, 3].map((shot) => ({ shot, at: "2024-01-01" })));
    });

    it("an input holding a Date is refused before the thread exists", async () => {
      const { wf, seen } = probe(() => 1);
      const t = thread();
      const error = await rejection(run(wf, { store: store.uri(), thread: t, input: { v: { since: new Date(0) } } }));
      expectCode(error, "INVALID_INPUT");
      expect(error.message).toContain("v.since is a Date");
      expect(seen.runs.one).toBe(0);
      expect(await historySteps(store.uri(), t)).toEqual([]);
    });

    it("a plain StateGraph node returning a Map of Dates is refused; its input too", async () => {
      const State = Annotation.Root({ topic: Annotation<unknown>(), draft: Annotation<unknown>() });
      let bad = true;
      const graph = new StateGraph(State)
        .addNode("write", () => ({ draft: bad ? new Map([["at", new Date(0)]]) : new Map([["at", "2024"]]) }))
        .addEdge("__start__", "write");
      const t = thread();
      const error = await rejection(run(graph, { store: store.uri(), thread: t, input: { topic: "x" } }));
      expectCode(error, "STEP_FAILED");
      expect(error.message).toContain('Node "write" returned a value the store cannot keep exactly: draft.get("at") is a Date');
      expect(await historySteps(store.uri(), t)).not.toContain("write");
      bad = false;
      const done = await resume(graph, { store: store.uri(), thread: t });
      expect(done.state).toStrictEqual({ topic: "x", draft: new Map([["at", "2024"]]) });

      const t2 = thread();
      const refused = await rejection(run(graph, { store: store.uri(), thread: t2, input: { topic: 5n } }));
      expectCode(refused, "INVALID_STATE");
      expect(refused.message).toContain('input.topic (channel "__start__") is a BigInt (5n)');
      expect(await historySteps(store.uri(), t2)).toEqual([]);
    });
  });
}
