import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { AIMessage, HumanMessage } from "@langchain/core/messages";
import { JsonPlusSerializer, type Checkpoint, type SerializerProtocol } from "@langchain/langgraph-checkpoint";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { FileCheckpointSaver, openStore, resume, run, workflow, type OpenedStore } from "../src/index.ts";
import { expectCode, rejection } from "./helpers/errors.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();

/** LangGraph's serializer taking its own path for every value (a subclass, so no store treats it as the default). */
class StockSerializer extends JsonPlusSerializer {}

/**
 * Values as a step or LangGraph may hand them to a saver, written directly (no value check): plain JSON
 * that takes the fast path, and everything the serializer treats specially, which must not.
 */
function values(): Record<string, unknown> {
  const withProtoKey = JSON.parse('{"a":{"__proto__":{"x":1}},"b":2}') as unknown;
  const nullProto = Object.assign(Object.create(null) as object, { a: 1, b: [null] });
  return {
    plain: { a: 1, b: [1, 2, { c: "x" }], t: true, f: false, z: null, e: {}, l: [] },
    strings: ["a\u0000b", "\ud800 lone surrogate", "héllo 🌍 \u2028", '"quoted"\n\\', ""],
    numbers: [0, -0, 0.1 + 0.2, -1e308, Number.MIN_VALUE, Number.MAX_SAFE_INTEGER, NaN, Infinity],
    rows: Array.from({ length: 2_000 }, (_, i) => ({ i, tag: `row-${i}`, ok: i % 2 === 0 })),
    text: "x".repeat(100_000),
    map: new Map<unknown, unknown>([["a", 1], [{ k: 1 }, new Set([2])]]),
    set: new Set([1, "2", { a: [1] }]),
    regexp: /a+b/gi,
    undefinedInside: { list: [1, undefined, 3], obj: { a: undefined, b: 1 } },
    sparse: [1, , 3], // eslint-disable-line no-sparse-arrays
    lookAlike: { inner: { lc: 2, type: "undefined" } },
    protoKey: withProtoKey,
    nullProto,
    toJson: { toJSON: () => ({ viaToJson: true }) },
    messages: [new HumanMessage("hi"), new AIMessage({ content: "hello", id: "m1" })],
    topLevelString: "just a string",
    topLevelNumber: 42,
    topLevelNull: null,
  };
}

const VERSIONS = Object.fromEntries(Object.keys(values()).map((k, i) => [k, `0000000001.${String(i).padStart(8, "0")}`]));

function checkpoint(): Checkpoint {
  return {
    v: 4,
    id: "1f0c0000-0000-6000-8000-000000000001",
    ts: "2026-01-01T00:00:00.000Z",
    channel_values: values(),
    channel_versions: VERSIONS,
    versions_seen: {},
  };
}

async function writeThread(dir: string, serde?: SerializerProtocol): Promise<void> {
  const saver = new FileCheckpointSaver({ dir, stepFiles: false, serde });
  const config = await saver.put({ configurable: { thread_id: "t", checkpoint_ns: "" } }, checkpoint(), { source: "input", step: -1, parents: {} }, VERSIONS);
  await saver.putWrites(config, Object.entries(values()), "task-1");
  await saver.close();
}

async function readThread(dir: string, serde?: SerializerProtocol) {
  const saver = new FileCheckpointSaver({ dir, stepFiles: false, serde });
  const tuple = await saver.getTuple({ configurable: { thread_id: "t", checkpoint_ns: "" } });
  const written = await saver.getTuple({ configurable: { thread_id: "t", checkpoint_ns: "" } });
  await saver.close();
  return { values: tuple!.checkpoint.channel_values, writes: tuple!.pendingWrites!, again: written!.pendingWrites! };
}

/** The journal's checkpoint and writes lines (the header and end records carry times and random ids). */
async function recordLines(dir: string): Promise<string[]> {
  const text = await readFile(join(dir, "threads", "t", "journal.log"), "utf8");
  return text.split("\n").filter((line) => line.includes(`"k":"cp"`) || line.includes(`"k":"w"`));
}

/** A value compared with its prototypes (toStrictEqual does not look at a plain object's prototype). */
function shape(value: unknown): unknown {
  if (typeof value !== "object" || value === null) return value;
  if (Array.isArray(value)) return value.map(shape);
  if (value instanceof Map || value instanceof Set || value instanceof RegExp) return value;
  const proto = Object.getPrototypeOf(value) as object | null;
  return {
    proto: proto === Object.prototype ? "Object" : proto === null ? "null" : shape(proto),
    entries: Object.entries(value).map(([k, v]) => [k, shape(v)]),
  };
}

describe("values are written and read as LangGraph's serializer does, faster for plain JSON", () => {
  let dir = "";
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "cairn-big-state-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  it("file store: the same journal records byte for byte, and each reads the other's back identically", async () => {
    const stock = join(dir, "stock");
    const fast = join(dir, "fast");
    await writeThread(stock, new StockSerializer());
    await writeThread(fast);
    const stockLines = await recordLines(stock);
    expect(stockLines).toHaveLength(2);
    expect(await recordLines(fast)).toEqual(stockLines);

    // Journals written by the stock path (as every earlier cairn wrote them) read the same either way.
    const byStock = await readThread(stock, new StockSerializer());
    const byFast = await readThread(stock);
    expect(byFast.values).toStrictEqual(byStock.values);
    expect(shape(byFast.values)).toEqual(shape(byStock.values));
    expect(byFast.writes).toStrictEqual(byStock.writes);
    expect(shape(byFast.writes)).toEqual(shape(byStock.writes));
    // What the serializer restores: spot checks that the comparison above compares the right things.
    expect(byFast.values.map).toBeInstanceOf(Map);
    expect(byFast.values.undefinedInside).toStrictEqual({ list: [1, undefined, 3], obj: { a: undefined, b: 1 } });
    expect((byFast.values.messages as unknown[])[0]).toBeInstanceOf(HumanMessage);
    expect(byFast.values.lookAlike).toStrictEqual({ inner: undefined });
    expect(Object.getPrototypeOf((byFast.values.protoKey as { a: object }).a)).toEqual({ x: 1 });
    expect(byFast.values.rows).toStrictEqual(values().rows);
  });

  it("file store: a value handed out twice (a cached record) is a copy each time", async () => {
    const fast = join(dir, "fast-copies");
    await writeThread(fast);
    const saver = new FileCheckpointSaver({ dir: fast, stepFiles: false });
    const config = { configurable: { thread_id: "t", checkpoint_ns: "" } };
    const first = await saver.getTuple(config);
    const rows = first!.pendingWrites!.find(([, channel]) => channel === "rows")![2] as { i: number }[];
    rows[0]!.i = -1;
    rows.push({ i: -2 });
    const second = await saver.getTuple(config);
    expect(second!.pendingWrites!.find(([, channel]) => channel === "rows")![2]).toStrictEqual(values().rows);
    await saver.close();
  });

  const sqlStores: { name: string; uri: () => string; skip?: boolean; cleanup?: () => Promise<void> }[] = [
    { name: "sqlite", uri: () => `sqlite:${join(dir, "serde.db")}` },
  ];
  const schema = uniqueSchema("cairn_serde");
  sqlStores.push({ name: "postgres", uri: () => postgresUri(schema), skip: !postgres.ok, cleanup: () => dropSchema(schema) });

  for (const store of sqlStores) {
    it.skipIf(store.skip === true)(`${store.name}: the store's serializer writes the same bytes as LangGraph's and reads them back identically`, async () => {
      let opened: OpenedStore | undefined;
      try {
        opened = await openStore(store.uri());
        const stock = new StockSerializer();
        for (const [name, value] of Object.entries(values())) {
          const [type, bytes] = await opened.saver.serde.dumpsTyped(value);
          const [stockType, stockBytes] = await stock.dumpsTyped(value);
          expect({ name, type, text: Buffer.from(bytes).toString("utf8") }).toEqual({ name, type: stockType, text: Buffer.from(stockBytes).toString("utf8") });
          const read = await opened.saver.serde.loadsTyped(stockType, stockBytes);
          const stockRead = await stock.loadsTyped(stockType, stockBytes);
          expect(read).toStrictEqual(stockRead);
          expect(shape(read)).toEqual(shape(stockRead));
        }
      } finally {
        await opened?.close();
        await store.cleanup?.();
      }
    });
  }
});

/**
 * A million items on the file store (about 25 s on 2 busy cores, several times that before the fast
 * path); SQLite, which rewrites the whole state per checkpoint, runs a tenth of that here and the million
 * in bench/big-state.ts. `CAIRN_BIG_STATE_ITEMS` sets both.
 */
const ITEMS = { file: 1_000_000, sqlite: 100_000 };
if (process.env.CAIRN_BIG_STATE_ITEMS) ITEMS.file = ITEMS.sqlite = Number(process.env.CAIRN_BIG_STATE_ITEMS);

describe("a list of a million items in the state: run, a failing step, resume", () => {
  let dir = "";
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "cairn-big-list-"));
  });
  afterAll(() => rm(dir, { recursive: true, force: true }));

  const row = (i: number) => ({ i, tag: `row-${i}` });
  const bigList = (count: number) => {
    const counts = { fill: 0, sum: 0 };
    let fail = true;
    let seen: { i: number; tag: string }[] = [];
    const wf = workflow("big-list", { state: z.object({ rows: z.array(z.object({ i: z.number(), tag: z.string() })).default([]), total: z.number().default(0) }) })
      .step("fill", () => {
        counts.fill += 1;
        return { rows: Array.from({ length: count }, (_, i) => row(i)) };
      })
      .step(
        "sum",
        (s) => {
          counts.sum += 1;
          seen = s.rows;
          if (fail) {
            fail = false;
            throw new Error("stopped after the big step");
          }
          return { total: s.rows.reduce((a, r) => a + r.i, 0) };
        },
        { retry: false },
      );
    return { wf, counts, seen: () => seen };
  };

  /** Every item exactly as written (one pass; a deep equal of a million objects is slow in the matcher). */
  const expectRows = (rows: { i: number; tag: string }[], count: number) => {
    expect(rows).toHaveLength(count);
    let wrong = -1;
    for (let i = 0; i < count && wrong < 0; i += 1) {
      const r = rows[i]!;
      if (r.i !== i || r.tag !== `row-${i}` || Object.keys(r).length !== 2) wrong = i;
    }
    expect(wrong === -1 ? "all exact" : { index: wrong, row: rows[wrong] }).toBe("all exact");
  };

  for (const store of ["file", "sqlite"] as const) {
    const BIG = ITEMS[store];
    it(`${store} store, ${BIG.toLocaleString("en-US")} items: the resume reruns only the failed step and sees every item exactly`, { timeout: 600_000 }, async () => {
      const uri = store === "file" ? `file:${join(dir, "store")}` : `sqlite:${join(dir, "big.db")}`;
      const { wf, counts, seen } = bigList(BIG);
      expectCode(await rejection(run(wf, { store: uri, thread: "big" })), "STEP_FAILED");
      const done = await resume(wf, { store: uri, thread: "big" });
      expect(counts).toEqual({ fill: 1, sum: 2 });
      expectRows(seen(), BIG);
      expectRows(done.state.rows, BIG);
      expect(done.state.total).toBe((BIG * (BIG - 1)) / 2);
    });
  }
});
