import { mkdir } from "node:fs/promises";
import { uniqueVersion } from "./versions.ts";
import { CairnSerializer } from "./serde.ts";
import { dirname, resolve } from "node:path";
import type { BaseCheckpointSaver, ChannelVersions } from "@langchain/langgraph-checkpoint";
import { CairnError } from "../errors.ts";
import { FileArtifactStore, PostgresArtifactStore, SqliteArtifactStore, type ArtifactStore } from "./artifacts.ts";
import { FileCheckpointSaver, type DeletedCheckpoints } from "./file.ts";
import { postgresMaintenance, sqliteMaintenance } from "./maintenance.ts";

/** The backends a store URI can name. */
export type StoreKind = "file" | "sqlite" | "postgres";

/** A checkpoint store opened from a URI: the saver to compile graphs with, plus what cairn needs around it. */
export interface OpenedStore {
  kind: StoreKind;
  /**
   * The store as it was resolved, for messages and listings: `file:/abs/.cairn`, `sqlite:/abs/x.db`,
   * `postgres://user@host:5432/db`. Passwords are masked as `***`.
   */
  uri: string;
  /** The LangGraph checkpointer. */
  saver: BaseCheckpointSaver;
  /** Where steps' binary outputs are kept (`ctx.artifacts`). */
  artifacts: ArtifactStore;
  /** Ids of every thread in the store, sorted by code unit (the same order for every backend). */
  listThreadIds(): Promise<string[]>;
  /**
   * Delete these checkpoints of a thread (its root namespace) and their pending writes; with
   * `dryRun`, only say what would go. The thread's newest checkpoint is never deleted (ids naming it,
   * or naming no checkpoint of the thread, are passed over): remove a whole thread with
   * `saver.deleteThread`. Parent links of the checkpoints kept are left as they are.
   *
   * The file store compacts the thread's journal (crash-safe, under the thread's writer lock: a thread
   * another live process writes is refused with `THREAD_LOCKED`); SQLite and Postgres delete rows in one
   * transaction (and, on Postgres, the channel values no remaining checkpoint reads).
   */
  deleteCheckpoints(thread: string, ids: readonly string[], options?: { dryRun?: boolean }): Promise<DeletedCheckpoints>;
  /**
   * Disk use of a thread: the bytes of its folder on the file store; on SQLite and Postgres the stored
   * bytes of its rows (approximate: no indexes, page or row overhead).
   */
  threadBytes(thread: string): Promise<number>;
  /** Release the files, database handle or connection pool. Safe to call more than once. */
  close(): Promise<void>;
}

/** The store used when neither an argument nor `CAIRN_STORE` names one: `.cairn` in the working directory. */
export const DEFAULT_STORE_URI = "file:.cairn";

const ACCEPTED_FORMS = "file:<dir>, sqlite:<path>, postgres://user@host:port/db";

/** Postgres connections fail fast instead of hanging on a host that drops packets. */
const POSTGRES_CONNECT_TIMEOUT_MS = 10_000;

/**
 * Open the checkpoint store a URI names.
 *
 * - `file:<dir>`: cairn's {@link FileCheckpointSaver} (no database driver is loaded).
 * - `sqlite:<path>`: LangGraph's `SqliteSaver`, with `synchronous=FULL` so a committed checkpoint survives
 *   power loss. The parent directory is created.
 * - `postgres://user@host:port/db` (or `postgresql://`): LangGraph's `PostgresSaver`, set up (tables
 *   created or migrated) before it is returned, with fork-safe channel versions. `?schema=name` picks the
 *   Postgres schema (default `public`).
 *
 * The URI is `uri`, else `CAIRN_STORE`, else {@link DEFAULT_STORE_URI}. Relative paths resolve against
 * `opts.cwd`, else the process's working directory.
 *
 * @throws CairnError `UNSUPPORTED_STORE` when the URI has none of the forms above, `STORE_UNAVAILABLE`
 *   when the database cannot be opened or reached.
 *
 * @example
 * ```ts
 * const store = await openStore("sqlite:runs/cairn.db");
 * try {
 *   const app = graph.compile({ checkpointer: store.saver });
 *   await app.invoke(input, { configurable: { thread_id: "run-1" } });
 * } finally {
 *   await store.close();
 * }
 * ```
 */
export async function openStore(uri?: string, opts: { cwd?: string } = {}): Promise<OpenedStore> {
  const raw = uri ?? (process.env.CAIRN_STORE || DEFAULT_STORE_URI);
  const target = parseStoreUri(raw, opts.cwd ?? process.cwd());
  switch (target.kind) {
    case "file":
      return openFile(target.path);
    case "sqlite":
      return openSqlite(target.path);
    case "postgres":
      return openPostgres(target);
  }
}

// -------------------------------------------------------------------------------------------------
// Parsing (pure)

type StoreTarget =
  | { kind: "file" | "sqlite"; path: string }
  | { kind: "postgres"; connectionString: string; schema: string; display: string };

function parseStoreUri(raw: string, cwd: string): StoreTarget {
  for (const kind of ["file", "sqlite"] as const) {
    if (!raw.startsWith(`${kind}:`)) continue;
    const path = raw.slice(kind.length + 1);
    if (path.trim() === "") throw unsupported(raw, `the ${kind} path is empty`);
    return { kind, path: resolve(cwd, path) };
  }
  if (/^postgres(ql)?:\/\//i.test(raw)) return parsePostgresUri(raw);
  throw unsupported(raw);
}

function parsePostgresUri(raw: string): StoreTarget {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw unsupported(raw, "it is not a valid URL");
  }
  const schema = url.searchParams.get("schema") ?? "public";
  // PostgresSaver splices the schema into its SQL inside double quotes; allow only plain identifiers.
  if (!/^[A-Za-z_][A-Za-z0-9_]{0,62}$/.test(schema)) {
    throw unsupported(raw, `schema "${schema}" is not a plain identifier (letters, digits, _)`);
  }
  const display = normalizePostgresUri(raw);
  // `schema` is cairn's parameter, not libpq's: pg must not see it.
  url.searchParams.delete("schema");
  return { kind: "postgres", connectionString: url.toString(), schema, display };
}

/** The value as given, except that a password (in the user info or a `password` parameter) reads `***`. */
function hidePassword(raw: string): string {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    return raw;
  }
  const params = [...url.searchParams.keys()].filter((key) => key.toLowerCase() === "password");
  if (!url.password && params.length === 0) return raw;
  if (url.password) url.password = "***";
  for (const key of params) url.searchParams.set(key, "***");
  return url.toString();
}

/** `postgres://user@host:5432/db?…`: one scheme, the port spelled out, the password masked. */
function normalizePostgresUri(raw: string): string {
  const url = new URL(hidePassword(raw));
  url.protocol = "postgres:";
  if (url.hostname && !url.port) url.port = "5432";
  return url.toString();
}

function unsupported(raw: string, why?: string): CairnError {
  const shown = hidePassword(raw);
  const reason = why ? `: ${why}` : "";
  return new CairnError(
    "UNSUPPORTED_STORE",
    `Unsupported store "${shown}"${reason}. Use one of ${ACCEPTED_FORMS} (as an argument or in CAIRN_STORE).`,
    { store: shown },
  );
}

function unavailable(display: string, cause: unknown, advice: string): CairnError {
  return new CairnError("STORE_UNAVAILABLE", `Cannot open store ${display}: ${describeError(cause)}. ${advice}`, { store: display }, { cause });
}

function describeError(error: unknown): string {
  if (error instanceof AggregateError && !error.message) {
    // Node reports a refused connection to every address of a host as an AggregateError with no message.
    const inner = error.errors.map((e: unknown) => describeError(e)).filter(Boolean);
    if (inner.length > 0) return [...new Set(inner)].join("; ");
  }
  if (error instanceof Error) return error.message || (error as NodeJS.ErrnoException).code || error.name;
  return String(error);
}

// -------------------------------------------------------------------------------------------------
// file:

function openFile(dir: string): OpenedStore {
  const saver = new FileCheckpointSaver({ dir });
  return {
    kind: "file",
    uri: `file:${dir}`,
    saver,
    artifacts: new FileArtifactStore(dir),
    listThreadIds: () => saver.listThreadIds(),
    deleteCheckpoints: (thread, ids, options) => saver.deleteCheckpoints(thread, ids, options),
    threadBytes: (thread) => saver.threadBytes(thread),
    close: () => saver.close(),
  };
}

// -------------------------------------------------------------------------------------------------
// sqlite:

async function openSqlite(path: string): Promise<OpenedStore> {
  const display = `sqlite:${path}`;
  const advice = "Check that the path is a writable SQLite file (or does not exist yet) and that its folder can be created.";
  const [{ SqliteSaver }, { default: Database }] = await Promise.all([
    import("@langchain/langgraph-checkpoint-sqlite"),
    import("better-sqlite3"),
  ]);

  class DurableSqliteSaver extends SqliteSaver {
    /**
     * Create the tables and make every commit durable. SqliteSaver switches the file to WAL; in WAL mode
     * better-sqlite3 starts each later connection at synchronous=NORMAL (only the connection that created
     * the file keeps FULL), and NORMAL may lose the last commits on power loss. Per connection, so here.
     */
    prepare(): void {
      this.setup();
      this.db.pragma("synchronous = FULL");
    }
  }

  let db: InstanceType<typeof Database> | undefined;
  try {
    await mkdir(dirname(path), { recursive: true });
    db = new Database(path);
    const saver = new DurableSqliteSaver(db, new CairnSerializer());
    saver.prepare();
    const threads = db.prepare("SELECT DISTINCT thread_id FROM checkpoints").pluck();
    const maintenance = sqliteMaintenance(db);
    const opened = db;
    return {
      kind: "sqlite",
      uri: display,
      saver,
      artifacts: new SqliteArtifactStore(db, display),
      listThreadIds: async () => sortIds(threads.all() as string[]),
      deleteCheckpoints: (thread, ids, options) => maintenance.deleteCheckpoints(thread, ids, options),
      threadBytes: (thread) => maintenance.threadBytes(thread),
      close: async () => {
        if (opened.open) opened.close();
      },
    };
  } catch (error) {
    if (db?.open) db.close();
    throw unavailable(display, error, advice);
  }
}

// -------------------------------------------------------------------------------------------------
// postgres://

/**
 * The next channel version after `current`: `<n+1, 32 digits>.<16 random digits>`, as LangGraph Python's
 * Postgres saver mints them. PostgresSaver keys channel blobs by (thread, namespace, channel, version), so
 * the plain counter makes two branches forked from one checkpoint write the same keys, and a branch then
 * reads the other's value (langgraphjs#1812). The random part makes each branch's keys unique; the
 * zero-padded counter keeps versions ordered both by `compareChannelVersions` and by LangGraph's `>`.
 *
 * `current` may be undefined, a number (a version written by a plain PostgresSaver), or such a string.
 * @internal Exported for tests.
 */
export function nextChannelVersion(current: ChannelVersions[string] | undefined): string {
  return uniqueVersion(current, 32, 16);
}

async function openPostgres(target: Extract<StoreTarget, { kind: "postgres" }>): Promise<OpenedStore> {
  const { display, schema } = target;
  const advice = "Check that the Postgres server is running and reachable, and that the URI's user, password, host, port and database are right.";
  const [{ PostgresSaver }, { default: pg }] = await Promise.all([import("@langchain/langgraph-checkpoint-postgres"), import("pg")]);

  class ForkSafePostgresSaver extends PostgresSaver {
    // LangGraph types versions as numbers here, yet accepts strings at run time (its base class documents
    // string versions); the cast is only for the compiler.
    override getNextVersion(current: number | undefined): number {
      return nextChannelVersion(current) as unknown as number;
    }
  }

  const pool = new pg.Pool({ connectionString: target.connectionString, connectionTimeoutMillis: POSTGRES_CONNECT_TIMEOUT_MS });
  // An idle client that loses its server emits on the pool; unhandled, that would end the process. The
  // next query reports the failure instead.
  pool.on("error", () => {});
  const saver = new ForkSafePostgresSaver(pool, new CairnSerializer(), { schema });
  try {
    await saver.setup();
  } catch (error) {
    await pool.end().catch(() => {});
    throw unavailable(display, error, advice);
  }

  let closed = false;
  const maintenance = postgresMaintenance(pool, schema);
  return {
    kind: "postgres",
    uri: display,
    saver,
    artifacts: new PostgresArtifactStore(pool, schema, display),
    listThreadIds: async () => {
      const { rows } = await pool.query<{ thread_id: string }>(`SELECT DISTINCT thread_id FROM "${schema}".checkpoints`);
      return sortIds(rows.map((r) => r.thread_id));
    },
    deleteCheckpoints: (thread, ids, options) => maintenance.deleteCheckpoints(thread, ids, options),
    threadBytes: (thread) => maintenance.threadBytes(thread),
    close: async () => {
      if (closed) return;
      closed = true;
      await pool.end();
    },
  };
}

/** Sorted in JavaScript rather than by the database, whose collation may ignore case or punctuation. */
function sortIds(ids: string[]): string[] {
  return ids.sort();
}

/** Use the store given as an object as is, or open the one a URI names for the call and close it after. */
export async function withStore<R>(options: { store?: string | OpenedStore; cwd?: string }, fn: (store: OpenedStore) => Promise<R>): Promise<R> {
  if (typeof options.store === "object") return fn(options.store);
  const store = await openStore(options.store, { cwd: options.cwd });
  try {
    return await fn(store);
  } finally {
    await store.close();
  }
}
