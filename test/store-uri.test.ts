import { mkdtemp, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import Database from "better-sqlite3";
import { afterAll, afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Annotation, END, START, StateGraph } from "@langchain/langgraph";
import {
  BaseCheckpointSaver,
  compareChannelVersions,
  emptyCheckpoint,
  maxChannelVersion,
  uuid6,
  type Checkpoint,
  type CheckpointMetadata,
} from "@langchain/langgraph-checkpoint";
import { FileCheckpointSaver, isCairnError } from "cairn";
import { DEFAULT_STORE_URI, nextChannelVersion, openStore, type OpenedStore } from "../src/store/open.ts";
import { dropSchema, postgresUri, requirePostgresInCI, uniqueSchema } from "./helpers/postgres.ts";

const postgres = await requirePostgresInCI();

let cwd: string;
const stores: OpenedStore[] = [];

/** Open a store and close it after the test. */
async function open(uri?: string, at = cwd): Promise<OpenedStore> {
  const store = await openStore(uri, { cwd: at });
  stores.push(store);
  return store;
}

beforeEach(async () => {
  cwd = await mkdtemp(join(tmpdir(), "cairn-store-uri-"));
});
afterEach(async () => {
  vi.unstubAllEnvs();
  for (const store of stores.splice(0)) await store.close();
  await rm(cwd, { recursive: true, force: true });
});

const metadata: CheckpointMetadata = { source: "loop", step: 0, parents: {} };

function checkpoint(values: Record<string, unknown>, versions: Checkpoint["channel_versions"]): Checkpoint {
  return { ...emptyCheckpoint(), id: uuid6(-1), channel_values: values, channel_versions: versions };
}

/** Write one checkpoint on each thread, so listThreadIds has something to list. */
async function putThreads(saver: BaseCheckpointSaver, threads: string[]): Promise<void> {
  for (const thread_id of threads) {
    const v = saver.getNextVersion(undefined);
    await saver.put({ configurable: { thread_id, checkpoint_ns: "" } }, checkpoint({ x: thread_id }, { x: v }), metadata, { x: v });
  }
}

async function rejection(promise: Promise<unknown>): Promise<unknown> {
  return promise.then(
    () => expect.fail("expected openStore to reject"),
    (error: unknown) => error,
  );
}

describe("file:", () => {
  it("opens cairn's file store with the directory resolved against cwd", async () => {
    const store = await open("file:runs/.cairn");
    expect(store.kind).toBe("file");
    expect(store.uri).toBe(`file:${join(cwd, "runs/.cairn")}`);
    expect(store.saver).toBeInstanceOf(FileCheckpointSaver);
    expect(await store.listThreadIds()).toEqual([]);
    await putThreads(store.saver, ["b", "a"]);
    expect(await store.listThreadIds()).toEqual(["a", "b"]);
    await store.close();
    await store.close();
  });

  it("accepts an absolute directory", async () => {
    const store = await open(`file:${join(cwd, "abs")}`, "/");
    expect(store.uri).toBe(`file:${join(cwd, "abs")}`);
  });
});

describe("default and CAIRN_STORE", () => {
  it("defaults to file:.cairn in cwd", async () => {
    vi.stubEnv("CAIRN_STORE", undefined);
    expect(DEFAULT_STORE_URI).toBe("file:.cairn");
    const store = await open(undefined);
    expect(store.kind).toBe("file");
    expect(store.uri).toBe(`file:${join(cwd, ".cairn")}`);
  });

  it("defaults to the process's working directory without opts.cwd", async () => {
    vi.stubEnv("CAIRN_STORE", undefined);
    const store = await openStore();
    stores.push(store);
    expect(store.uri).toBe(`file:${join(process.cwd(), ".cairn")}`);
  });

  it("uses CAIRN_STORE when no URI is given, and an explicit URI over it", async () => {
    vi.stubEnv("CAIRN_STORE", "sqlite:from-env.db");
    const fromEnv = await open(undefined);
    expect(fromEnv.kind).toBe("sqlite");
    expect(fromEnv.uri).toBe(`sqlite:${join(cwd, "from-env.db")}`);
    const explicit = await open("file:explicit");
    expect(explicit.uri).toBe(`file:${join(cwd, "explicit")}`);
  });
});

describe("sqlite:", () => {
  it("opens the official SqliteSaver, making the parent directory", async () => {
    const store = await open("sqlite:nested/dir/cairn.db");
    expect(store.kind).toBe("sqlite");
    expect(store.uri).toBe(`sqlite:${join(cwd, "nested/dir/cairn.db")}`);
    expect(store.saver.constructor.name).toBe("DurableSqliteSaver");
    expect((await stat(join(cwd, "nested/dir/cairn.db"))).isFile()).toBe(true);
    expect(await store.listThreadIds()).toEqual([]);
    await putThreads(store.saver, ["thread-2", "thread-1", "thread-10"]);
    expect(await store.listThreadIds()).toEqual(["thread-1", "thread-10", "thread-2"]);
    await store.close();
    await store.close();
  });

  it("sets synchronous=FULL on a file another connection created", async () => {
    const path = join(cwd, "shared.db");
    const creator = await openStore(`sqlite:${path}`);
    await putThreads(creator.saver, ["t"]);
    // The control: a plain second connection to the WAL file starts at NORMAL (1), not FULL (2).
    const plain = new Database(path);
    expect(plain.pragma("synchronous", { simple: true })).toBe(1);
    plain.close();

    const store = await open(`sqlite:${path}`);
    const db = (store.saver as unknown as { db: Database.Database }).db;
    expect(db.pragma("synchronous", { simple: true })).toBe(2);
    expect(db.pragma("journal_mode", { simple: true })).toBe("wal");
    expect(await store.listThreadIds()).toEqual(["t"]);
    await creator.close();
  });

  it("reports a path it cannot open as STORE_UNAVAILABLE", async () => {
    const error = await rejection(openStore("sqlite:.", { cwd }));
    expect(isCairnError(error, "STORE_UNAVAILABLE")).toBe(true);
    expect((error as Error).message).toContain(`sqlite:${cwd}`);
  });
});

describe("unsupported URIs", () => {
  it.each(["mysql://x", "foo", "file:", "sqlite:", "", "postgres", "postgres://h/db?schema=bad-name"])(
    "rejects %j with UNSUPPORTED_STORE naming the value",
    async (uri) => {
      const error = await rejection(openStore(uri, { cwd }));
      expect(isCairnError(error, "UNSUPPORTED_STORE")).toBe(true);
      const message = (error as Error).message;
      expect(message).toContain(`"${uri}"`);
      expect(message).toContain("file:<dir>, sqlite:<path>, postgres://user@host:port/db");
      expect(message).not.toContain("\n");
    },
  );

  it("explains the accepted forms", async () => {
    const error = await rejection(openStore("mysql://x", { cwd }));
    expect((error as Error).message).toMatchInlineSnapshot(
      `"Unsupported store "mysql://x". Use one of file:<dir>, sqlite:<path>, postgres://user@host:port/db (as an argument or in CAIRN_STORE)."`,
    );
    expect((error as { details: unknown }).details).toEqual({ store: "mysql://x" });
  });

  it("says why an empty path is refused", async () => {
    const error = await rejection(openStore("file:", { cwd }));
    expect((error as Error).message).toMatchInlineSnapshot(
      `"Unsupported store "file:": the file path is empty. Use one of file:<dir>, sqlite:<path>, postgres://user@host:port/db (as an argument or in CAIRN_STORE)."`,
    );
  });

  it("masks a password in the value it names", async () => {
    const error = await rejection(openStore("mysql://me:hunter2@db.example/app", { cwd }));
    expect((error as Error).message).toContain("mysql://me:***@db.example/app");
    expect(JSON.stringify(error)).not.toContain("hunter2");
    expect((error as Error).message).not.toContain("hunter2");
  });
});

describe("postgres:// when the server is unreachable", () => {
  it("fails fast with STORE_UNAVAILABLE naming the masked URI, the cause and what to do", async () => {
    const started = Date.now();
    const error = await rejection(openStore("postgresql://me:hunter2@127.0.0.1:1/test", { cwd }));
    expect(Date.now() - started).toBeLessThan(5_000);
    expect(isCairnError(error, "STORE_UNAVAILABLE")).toBe(true);
    const message = (error as Error).message;
    expect(message).toContain("postgres://me:***@127.0.0.1:1/test");
    expect(message).toContain("ECONNREFUSED");
    expect(message).toContain("Check that the Postgres server is running");
    expect(message).not.toContain("hunter2");
  });
});

describe("fork-safe channel versions", () => {
  it("mints versions that order correctly and never repeat", () => {
    const chain = [nextChannelVersion(undefined)];
    for (let i = 0; i < 120; i += 1) chain.push(nextChannelVersion(chain.at(-1)));
    expect(chain[0]).toMatch(/^0{31}1\.\d{16}$/);
    expect(chain[9]).toMatch(/^0{30}10\.\d{16}$/);
    for (let i = 1; i < chain.length; i += 1) {
      const [before, after] = [chain[i - 1]!, chain[i]!];
      expect(compareChannelVersions(after, before)).toBe(1);
      // LangGraph's trigger checks compare versions with `>`, not compareChannelVersions.
      expect(after > before).toBe(true);
    }
    expect(maxChannelVersion(...[...chain].reverse())).toBe(chain.at(-1));
    // Numbers from a plain PostgresSaver continue the count.
    expect(nextChannelVersion(41)).toMatch(/^0{30}42\.\d{16}$/);
    const siblings = new Set(Array.from({ length: 50 }, () => nextChannelVersion(chain[3])));
    expect(siblings.size).toBe(50);
  });
});

describe.skipIf(!postgres.ok)("postgres://", () => {
  const schema = uniqueSchema();
  afterAll(async () => {
    await dropSchema(schema);
  });

  it("opens the official PostgresSaver, set up, in the named schema", async () => {
    const store = await open(postgresUri(schema));
    expect(store.kind).toBe("postgres");
    expect(store.uri).toMatch(new RegExp(`^postgres://[^@]+@[^/]+:\\d+/\\w+\\?schema=${schema}$`));
    expect(await store.listThreadIds()).toEqual([]);
    await putThreads(store.saver, ["b", "a", "B"]);
    expect(await store.listThreadIds()).toEqual(["B", "a", "b"]);
    await store.close();
    await store.close();
  });

  it("masks the password in its uri", async () => {
    const url = new URL(postgresUri(schema));
    url.password = "hunter2"; // trust auth ignores it
    const store = await open(url.toString());
    expect(store.uri).toContain(":***@");
    expect(store.uri).not.toContain("hunter2");
  });

  it("keeps two branches forked from one checkpoint apart (langgraphjs#1812)", async () => {
    const store = await open(postgresUri(schema));
    const { saver } = store;
    const thread_id = "fork";
    const vA = saver.getNextVersion(undefined);
    const configA = await saver.put({ configurable: { thread_id, checkpoint_ns: "" } }, checkpoint({ x: 1 }, { x: vA }), metadata, { x: vA });

    const branches = [];
    for (const value of ["left", "right"]) {
      const v = saver.getNextVersion(vA);
      const config = await saver.put(configA, checkpoint({ x: value }, { x: v }), metadata, { x: v });
      branches.push({ value, config, v });
    }
    expect(branches[0]!.v).not.toBe(branches[1]!.v);
    for (const { value, config } of branches) {
      expect((await saver.getTuple(config))?.checkpoint.channel_values).toEqual({ x: value });
    }
    expect((await saver.getTuple(configA))?.checkpoint.channel_values).toEqual({ x: 1 });

    // The control: the same writes with the stock integer versions collide, the right branch reads "left".
    const stockNext = (v: number | undefined) => BaseCheckpointSaver.prototype.getNextVersion.call(saver, v);
    const root = { configurable: { thread_id: "fork-stock", checkpoint_ns: "" } };
    const stockA = await saver.put(root, checkpoint({ x: 1 }, { x: stockNext(undefined) }), metadata, { x: 1 });
    const stock = [];
    for (const value of ["left", "right"]) {
      stock.push(await saver.put(stockA, checkpoint({ x: value }, { x: stockNext(1) }), metadata, { x: stockNext(1) }));
    }
    expect((await saver.getTuple(stock[1]!))?.checkpoint.channel_values).toEqual({ x: "left" });
  });

  it("keeps forks of a real graph apart when a step is rewritten twice", async () => {
    const store = await open(postgresUri(schema));
    const State = Annotation.Root({ text: Annotation<string>(), out: Annotation<string>() });
    const app = new StateGraph(State)
      .addNode("draft", (s) => ({ text: `${s.text}+draft` }))
      .addNode("publish", (s) => ({ out: `published ${s.text}` }))
      .addEdge(START, "draft")
      .addEdge("draft", "publish")
      .addEdge("publish", END)
      .compile({ checkpointer: store.saver });
    const config = { configurable: { thread_id: "graph-fork" } };
    await app.invoke({ text: "v0" }, config);

    let afterDraft;
    for await (const snapshot of app.getStateHistory(config)) {
      if (snapshot.next[0] === "publish") afterDraft = snapshot.config;
    }
    expect(afterDraft).toBeDefined();
    const one = await app.updateState(afterDraft!, { text: "one" }, "draft");
    const two = await app.updateState(afterDraft!, { text: "two" }, "draft");
    expect((await app.invoke(null, one)).out).toBe("published one");
    expect((await app.invoke(null, two)).out).toBe("published two");
    expect((await app.getState(one)).values.text).toBe("one");
  });
});
