import { mkdir } from "node:fs/promises";
import { uniqueVersion } from "./versions.ts";
import { CairnSerializer } from "./serde.ts";
import type { StoreFs } from "./fs.ts";
import { dirname, resolve } from "node:path";
import type { BaseCheckpointSaver, ChannelVersions, PendingWrite } from "@langchain/langgraph-checkpoint";
import type { RunnableConfig } from "@langchain/core/runnables";
import { CairnError } from "../errors.ts";
import { FileArtifactStore, PostgresArtifactStore, SqliteArtifactStore, type ArtifactStore } from "./artifacts.ts";
import { FileCheckpointSaver, type DeletedCheckpoints } from "./file.ts";
import { postgresMaintenance, sqliteMaintenance } from "./maintenance.ts";
import { fenceVerdict, leaseMs, leaseTable, lostLock, type LeaseRow, type LeaseTable, type LockHolder } from "./lease.ts";

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
  /**
   * Take the thread's writer lock for this process, or fail fast with `THREAD_LOCKED` naming the live
   * holder (pid, host, since). A lock whose holder died on this host, or whose lease ran out, is taken
   * over. The lock is renewed in the background and held until {@link releaseThread} or {@link close}; every checkpoint write is
   * fenced by it (a holder that lost it has its writes refused or ignored, never recorded). On the file
   * store a thread that does not exist yet is locked by its first write.
   */
  lockThread(thread: string): Promise<void>;
  /**
   * Give up this store object's lock of the thread, if it holds it (`run` and `resume` do when they end).
   * The store stays open; a later write through it takes the lock again.
   */
  releaseThread(thread: string): Promise<void>;
  /** Who holds the thread's lock, if anyone; `stale` when it may be taken over, `mine` for this store object. */
  lockHolder(thread: string): Promise<(LockHolder & { stale: boolean; mine: boolean }) | undefined>;
  /**
   * Break the thread's lock: a stale one always, a live one only with `force` (its holder then cannot
   * write again and stops with `THREAD_LOCKED` at its next write). Returns the holder broken, if any.
   */
  unlockThread(thread: string, options?: { force?: boolean }): Promise<LockHolder | undefined>;
  /** Release the files, database handle or connection pool, and the threads' locks. Safe to call more than once. */
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

/**
 * The file store over `dir`. `fs` is for cairn's own crash and disk-full tests only: the file operations
 * the saver and its artifact store use (see fs.ts); not exported from the package.
 */
export function openFile(dir: string, fs?: StoreFs): OpenedStore {
  const saver = new FileCheckpointSaver({ dir }, { fs });
  return {
    kind: "file",
    uri: `file:${dir}`,
    saver,
    artifacts: new FileArtifactStore(dir, fs),
    listThreadIds: () => saver.listThreadIds(),
    deleteCheckpoints: (thread, ids, options) => saver.deleteCheckpoints(thread, ids, options),
    threadBytes: (thread) => saver.threadBytes(thread),
    lockThread: (thread) => saver.lockThread(thread),
    releaseThread: (thread) => saver.releaseThread(thread),
    lockHolder: (thread) => saver.lockHolder(thread),
    unlockThread: (thread, options) => saver.unlockThread(thread, options?.force ?? false),
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
  type Db = InstanceType<typeof Database>;

  class DurableSqliteSaver extends SqliteSaver {
    leases?: LeaseTable;
    /**
     * Create the tables and make every commit durable. SqliteSaver switches the file to WAL; in WAL mode
     * better-sqlite3 starts each later connection at synchronous=NORMAL (only the connection that created
     * the file keeps FULL), and NORMAL may lose the last commits on power loss. Per connection, so here.
     */
    prepare(): void {
      this.setup();
      this.db.pragma("synchronous = FULL");
    }

    override put(...args: Parameters<InstanceType<typeof SqliteSaver>["put"]>): ReturnType<InstanceType<typeof SqliteSaver>["put"]> {
      const thread = String(args[0].configurable?.thread_id);
      return this.leases ? this.leases.write(thread, () => super.put(...args)) : super.put(...args);
    }

    override putWrites(config: RunnableConfig, writes: PendingWrite[], taskId: string): Promise<void> {
      const thread = String(config.configurable?.thread_id);
      return this.leases ? this.leases.write(thread, () => super.putWrites(config, writes, taskId)) : super.putWrites(config, writes, taskId);
    }

    override async deleteThread(threadId: string): Promise<void> {
      await this.leases?.refuseIfHeld(threadId);
      return super.deleteThread(threadId);
    }
  }

  let db: Db | undefined;
  try {
    await mkdir(dirname(path), { recursive: true });
    db = new Database(path);
    const opened = db;
    opened.exec(SQLITE_LEASES);
    const leases = sqliteLeases(opened, display);
    const saver = new DurableSqliteSaver(fencedSqlite(opened, display, leases), new CairnSerializer());
    saver.leases = leases;
    saver.prepare();
    const threads = db.prepare("SELECT DISTINCT thread_id FROM checkpoints").pluck();
    const maintenance = sqliteMaintenance(db);
    return {
      kind: "sqlite",
      uri: display,
      saver,
      artifacts: new SqliteArtifactStore(db, display),
      listThreadIds: async () => sortIds(threads.all() as string[]),
      deleteCheckpoints: async (thread, ids, options) => {
        await leases.refuseIfHeld(thread);
        return maintenance.deleteCheckpoints(thread, ids, options);
      },
      threadBytes: (thread) => maintenance.threadBytes(thread),
      lockThread: (thread) => leases.acquire(thread),
      releaseThread: (thread) => leases.release(thread),
      lockHolder: (thread) => leases.holder(thread),
      unlockThread: (thread, options) => leases.breakLock(thread, options?.force ?? false),
      close: async () => {
        if (!opened.open) return;
        await leases.releaseAll();
        opened.close();
      },
    };
  } catch (error) {
    if (db?.open) db.close();
    throw unavailable(display, error, advice);
  }
}

const SQLITE_LEASES = `CREATE TABLE IF NOT EXISTS cairn_leases (
  thread_id TEXT PRIMARY KEY, token TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL, since TEXT NOT NULL, expires TEXT NOT NULL
)`;

/** The subset of better-sqlite3 the lease code uses. */
interface SqliteHandle {
  prepare(sql: string): { run(...args: unknown[]): { changes: number | bigint }; get(...args: unknown[]): unknown };
  transaction<A extends unknown[], R>(fn: (...args: A) => R): ((...args: A) => R) & { immediate(...args: A): R };
  readonly inTransaction: boolean;
}

function sqliteLeases(db: SqliteHandle, where: string): LeaseTable {
  const read = db.prepare("SELECT token, pid, host, since, expires FROM cairn_leases WHERE thread_id = ?");
  const write = db.prepare("INSERT OR REPLACE INTO cairn_leases (thread_id, token, pid, host, since, expires) VALUES (?, ?, ?, ?, ?, ?)");
  const renew = db.prepare("UPDATE cairn_leases SET expires = ? WHERE thread_id = ? AND token = ?");
  const remove = db.prepare("DELETE FROM cairn_leases WHERE thread_id = ? AND token = ?");
  return leaseTable({
    where,
    async swap(thread, decide) {
      // IMMEDIATE: the write lock is taken before the read, so no other process changes the row between.
      db.transaction(() => {
        const next = decide(read.get(thread) as LeaseRow | undefined);
        if (next !== "keep") write.run(thread, next.token, next.pid, next.host, next.since, next.expires);
      }).immediate();
    },
    read: async (thread) => read.get(thread) as LeaseRow | undefined,
    renew: async (thread, token, expires) => Number(renew.run(expires, thread, token).changes) > 0,
    async remove(thread, token) {
      remove.run(thread, token);
    },
  });
}

/**
 * The database SqliteSaver is given: the same connection, except that its checkpoint and task-write
 * inserts run in one transaction with the lease's fence. The holder's write touches its lease row
 * (`UPDATE … WHERE token = mine`) and is rolled back when the row carries another token; a write by
 * a process holding no lock goes through unless another process holds a live one.
 */
function fencedSqlite<T extends object>(db: T & SqliteHandle, where: string, leases: LeaseTable): T {
  const read = db.prepare("SELECT token, pid, host, since, expires FROM cairn_leases WHERE thread_id = ?");
  const touch = db.prepare("UPDATE cairn_leases SET expires = ? WHERE thread_id = ? AND token = ?");
  const fence = (thread: string) => {
    // The lock held when the saver's put or putWrites was called (see LeaseTable.write).
    const write = leases.currentWrite();
    const token = write?.thread === thread ? write.token : leases.tokenOf(thread);
    if (token !== undefined) {
      if (Number(touch.run(new Date(Date.now() + leaseMs()).toISOString(), thread, token).changes) === 0) throw lostLock(thread, where);
      return;
    }
    const refused = fenceVerdict(thread, where, undefined, read.get(thread) as LeaseRow | undefined);
    if (refused) throw refused;
  };
  const fencedStatement = (stmt: { run(...args: unknown[]): unknown }) =>
    new Proxy(stmt, {
      get(target, prop) {
        const value = Reflect.get(target, prop, target) as unknown;
        if (prop !== "run") return typeof value === "function" ? value.bind(target) : value;
        return (...args: unknown[]) => {
          const tx = db.transaction(() => {
            fence(String(args[0]));
            return target.run(...args);
          });
          return db.inTransaction ? tx() : tx.immediate();
        };
      },
    });
  return new Proxy(db, {
    get(target, prop) {
      const value = Reflect.get(target, prop, target) as unknown;
      if (prop === "prepare") {
        return (sql: string) => {
          const stmt = target.prepare(sql);
          // SqliteSaver's two writes: a checkpoint row, and a task's write rows (thread id first in both).
          return /^\s*INSERT\b[^(]*\bINTO\s+(checkpoints|writes)\b/i.test(sql) ? fencedStatement(stmt) : stmt;
        };
      }
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
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

  let leases: LeaseTable | undefined;

  class ForkSafePostgresSaver extends PostgresSaver {
    // LangGraph types versions as numbers here, yet accepts strings at run time (its base class documents
    // string versions); the cast is only for the compiler.
    override getNextVersion(current: number | undefined): number {
      return nextChannelVersion(current) as unknown as number;
    }

    override put(...args: Parameters<BaseCheckpointSaver["put"]>): ReturnType<BaseCheckpointSaver["put"]> {
      return leases!.write(String(args[0].configurable?.thread_id), () => super.put(...args));
    }

    override putWrites(config: RunnableConfig, writes: PendingWrite[], taskId: string): Promise<void> {
      return leases!.write(String(config.configurable?.thread_id), () => super.putWrites(config, writes, taskId));
    }

    override async deleteThread(threadId: string): Promise<void> {
      await leases?.refuseIfHeld(threadId);
      return super.deleteThread(threadId);
    }
  }

  const pool = new pg.Pool({ connectionString: target.connectionString, connectionTimeoutMillis: POSTGRES_CONNECT_TIMEOUT_MS });
  // An idle client that loses its server emits on the pool; unhandled, that would end the process. The
  // next query reports the failure instead.
  pool.on("error", () => {});
  const table = `"${schema}".cairn_leases`;
  leases = postgresLeases(pool, table, display);
  const held = leases;
  const saver = new ForkSafePostgresSaver(fencedPool(pool, table, display, held) as unknown as typeof pool, new CairnSerializer(), { schema });
  try {
    await saver.setup();
    await createPostgresLeases(pool, table);
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
    deleteCheckpoints: async (thread, ids, options) => {
      await held.refuseIfHeld(thread);
      return maintenance.deleteCheckpoints(thread, ids, options);
    },
    threadBytes: (thread) => maintenance.threadBytes(thread),
    lockThread: (thread) => held.acquire(thread),
    releaseThread: (thread) => held.release(thread),
    lockHolder: (thread) => held.holder(thread),
    unlockThread: (thread, options) => held.breakLock(thread, options?.force ?? false),
    close: async () => {
      if (closed) return;
      closed = true;
      await held.releaseAll();
      await pool.end();
    },
  };
}

/** The subset of pg used by the lease code. */
interface PgClient {
  query(text: string, values?: unknown[]): Promise<{ rows: any[]; rowCount: number | null }>;
  release(err?: unknown): void;
}
interface PgPool {
  query(text: string, values?: unknown[]): Promise<{ rows: any[]; rowCount: number | null }>;
  connect(): Promise<PgClient>;
  end(): Promise<void>;
}

async function createPostgresLeases(pool: PgPool, table: string): Promise<void> {
  try {
    await pool.query(
      `CREATE TABLE IF NOT EXISTS ${table} (thread_id TEXT PRIMARY KEY, token TEXT NOT NULL, pid INTEGER NOT NULL, host TEXT NOT NULL, since TEXT NOT NULL, expires TEXT NOT NULL)`,
    );
  } catch (error) {
    // Two processes creating the table at once: one wins, the other's "already exists" is no failure.
    const code = (error as { code?: string }).code;
    if (code !== "23505" && code !== "42P07") throw error;
  }
}

function postgresLeases(pool: PgPool, table: string, where: string): LeaseTable {
  const columns = "token, pid, host, since, expires";
  return leaseTable({
    where,
    async swap(thread, decide) {
      for (let attempt = 0; ; attempt += 1) {
        const client = await pool.connect();
        try {
          await client.query("BEGIN");
          const { rows } = await client.query(`SELECT ${columns} FROM ${table} WHERE thread_id = $1 FOR UPDATE`, [thread]);
          const row = rows[0] as LeaseRow | undefined;
          const next = decide(row);
          let raced = false;
          if (next !== "keep") {
            const values = [thread, next.token, next.pid, next.host, next.since, next.expires];
            if (row) {
              await client.query(`UPDATE ${table} SET token = $2, pid = $3, host = $4, since = $5, expires = $6 WHERE thread_id = $1`, values);
            } else {
              // No row to lock yet: two processes may insert at once; the loser reads the winner's row.
              const inserted = await client.query(`INSERT INTO ${table} (thread_id, ${columns}) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (thread_id) DO NOTHING`, values);
              raced = inserted.rowCount === 0;
            }
          }
          await client.query(raced ? "ROLLBACK" : "COMMIT");
          if (!raced || attempt >= 5) return;
        } catch (error) {
          await client.query("ROLLBACK").catch(() => {});
          throw error;
        } finally {
          client.release();
        }
      }
    },
    async read(thread) {
      const { rows } = await pool.query(`SELECT ${columns} FROM ${table} WHERE thread_id = $1`, [thread]);
      return rows[0] as LeaseRow | undefined;
    },
    async renew(thread, token, expires) {
      const { rowCount } = await pool.query(`UPDATE ${table} SET expires = $3 WHERE thread_id = $1 AND token = $2`, [thread, token, expires]);
      return (rowCount ?? 0) > 0;
    },
    async remove(thread, token) {
      await pool.query(`DELETE FROM ${table} WHERE thread_id = $1 AND token = $2`, [thread, token]);
    },
  });
}

/**
 * The pool PostgresSaver is given: the same pool, except that a checkpoint or task-write transaction
 * checks the lease just before its COMMIT, in the same transaction. The holder touches its lease row
 * (`UPDATE … WHERE token = mine`, which also waits for a takeover committing at the same moment); when
 * no row carries its token any more the COMMIT is not sent, PostgresSaver rolls back, and the write fails
 * with THREAD_LOCKED. A process holding no lock may write unless another process holds a live one.
 */
function fencedPool(pool: PgPool, table: string, where: string, leases: LeaseTable): PgPool {
  const fence = async (client: PgClient, thread: string, token: string | undefined) => {
    if (token !== undefined) {
      const expires = new Date(Date.now() + leaseMs()).toISOString();
      const { rowCount } = await client.query(`UPDATE ${table} SET expires = $3 WHERE thread_id = $1 AND token = $2`, [thread, token, expires]);
      if ((rowCount ?? 0) === 0) throw lostLock(thread, where);
      return;
    }
    const { rows } = await client.query(`SELECT token, pid, host, since, expires FROM ${table} WHERE thread_id = $1 FOR SHARE`, [thread]);
    const refused = fenceVerdict(thread, where, undefined, rows[0] as LeaseRow | undefined);
    if (refused) throw refused;
  };
  return new Proxy(pool, {
    get(target, prop) {
      if (prop === "connect") {
        return async () => {
          const client = await target.connect();
          return new Proxy(client, {
            get(c, p) {
              if (p === "query") {
                return async (text: string, values?: unknown[]) => {
                  const write = leases.currentWrite();
                  if (text === "COMMIT" && write) await fence(c, write.thread, write.token);
                  return c.query(text, values);
                };
              }
              const value = Reflect.get(c, p, c) as unknown;
              return typeof value === "function" ? value.bind(c) : value;
            },
          });
        };
      }
      const value = Reflect.get(target, prop, target) as unknown;
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
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
