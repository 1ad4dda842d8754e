import type { DeletedCheckpoints } from "./file.ts";

/**
 * Deleting checkpoints and measuring threads in LangGraph's SQL savers' own tables. The drivers are
 * not imported here: the store hands in its open database or pool.
 *
 * Like the file store: only the root namespace is pruned (subgraph checkpoints are kept), and a
 * thread's newest checkpoint is never deleted, whatever the ids say.
 */
export interface StoreMaintenance {
  deleteCheckpoints(thread: string, ids: readonly string[], options?: { dryRun?: boolean }): Promise<DeletedCheckpoints>;
  threadBytes(thread: string): Promise<number>;
}

/** The subset of better-sqlite3 used here. */
interface SqliteDb {
  exec(sql: string): unknown;
  prepare(sql: string): { run(...args: unknown[]): { changes: number | bigint }; get(...args: unknown[]): unknown; pluck(on?: boolean): { all(...args: unknown[]): unknown[] } };
}

/**
 * SqliteSaver's tables: `checkpoints` (the whole checkpoint per row) and `writes`. Rows go in one
 * transaction; the ids travel as one JSON array (`json_each`), so any number fits in one statement.
 * Sizes are the bytes of the stored columns; SQLite reuses freed pages, and the file itself shrinks
 * only after `VACUUM`.
 */
export function sqliteMaintenance(db: SqliteDb): StoreMaintenance {
  const newest = db.prepare("SELECT checkpoint_id FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' ORDER BY checkpoint_id DESC LIMIT 1").pluck();
  const existing = db
    .prepare("SELECT checkpoint_id FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN (SELECT value FROM json_each(?)) AND checkpoint_id <> ?")
    .pluck();
  const cpBytes = db.prepare(
    "SELECT COALESCE(SUM(COALESCE(length(CAST(checkpoint AS BLOB)), 0) + COALESCE(length(CAST(metadata AS BLOB)), 0)), 0) FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN (SELECT value FROM json_each(?))",
  );
  const writeBytes = db.prepare(
    "SELECT COALESCE(SUM(COALESCE(length(CAST(value AS BLOB)), 0)), 0) FROM writes WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN (SELECT value FROM json_each(?))",
  );
  const deleteWrites = db.prepare("DELETE FROM writes WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN (SELECT value FROM json_each(?))");
  const deleteCps = db.prepare("DELETE FROM checkpoints WHERE thread_id = ? AND checkpoint_ns = '' AND checkpoint_id IN (SELECT value FROM json_each(?))");
  const threadCpBytes = db.prepare(
    "SELECT COALESCE(SUM(COALESCE(length(CAST(checkpoint AS BLOB)), 0) + COALESCE(length(CAST(metadata AS BLOB)), 0)), 0) FROM checkpoints WHERE thread_id = ?",
  );
  const threadWriteBytes = db.prepare("SELECT COALESCE(SUM(COALESCE(length(CAST(value AS BLOB)), 0)), 0) FROM writes WHERE thread_id = ?");
  const single = (row: unknown) => Number(Object.values(row as Record<string, unknown>)[0] ?? 0);

  return {
    async deleteCheckpoints(thread, ids, options = {}) {
      // better-sqlite3 is synchronous: nothing else in this process runs between BEGIN and COMMIT.
      db.exec("BEGIN IMMEDIATE");
      try {
        const head = newest.all(thread)[0] as string | undefined;
        const doomed = head === undefined ? [] : (existing.all(thread, JSON.stringify(ids), head) as string[]);
        const list = JSON.stringify(doomed);
        const bytesFreed = doomed.length ? single(cpBytes.get(thread, list)) + single(writeBytes.get(thread, list)) : 0;
        if (!options.dryRun && doomed.length) {
          deleteWrites.run(thread, list);
          deleteCps.run(thread, list);
        }
        db.exec(options.dryRun ? "ROLLBACK" : "COMMIT");
        return { deleted: doomed, bytesFreed };
      } catch (error) {
        db.exec("ROLLBACK");
        throw error;
      }
    },
    async threadBytes(thread) {
      return single(threadCpBytes.get(thread)) + single(threadWriteBytes.get(thread));
    },
  };
}

/** The subset of pg used here: a pool that hands out clients for a transaction. */
interface PgPool {
  query<R = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<{ rows: R[] }>;
  connect(): Promise<{ query<R = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<{ rows: R[] }>; release(): void }>;
}

/**
 * PostgresSaver's tables: `checkpoints`, `checkpoint_blobs` (one value per thread, namespace, channel
 * and version, shared by every checkpoint that has that version) and `checkpoint_writes`. One
 * transaction deletes the checkpoints and their writes, then the blobs that a deleted checkpoint read
 * and no remaining checkpoint of the thread reads; blobs of other versions (a concurrent writer's new
 * values included) are never touched. Sizes are octet lengths of the stored columns (JSONB as text).
 */
export function postgresMaintenance(pool: PgPool, schema: string): StoreMaintenance {
  const t = (table: string) => `"${schema}".${table}`;
  return {
    async deleteCheckpoints(thread, ids, options = {}) {
      const client = await pool.connect();
      try {
        await client.query("BEGIN");
        try {
          const head = (
            await client.query<{ checkpoint_id: string }>(
              `SELECT checkpoint_id FROM ${t("checkpoints")} WHERE thread_id = $1 AND checkpoint_ns = '' ORDER BY checkpoint_id DESC LIMIT 1`,
              [thread],
            )
          ).rows[0]?.checkpoint_id;
          let deleted: string[] = [];
          let bytesFreed = 0;
          if (head !== undefined && ids.length > 0) {
            const gone = await client.query<{ checkpoint_id: string; versions: Record<string, unknown> | null; bytes: string }>(
              `DELETE FROM ${t("checkpoints")} WHERE thread_id = $1 AND checkpoint_ns = '' AND checkpoint_id = ANY($2::text[]) AND checkpoint_id <> $3
               RETURNING checkpoint_id, checkpoint -> 'channel_versions' AS versions, octet_length(checkpoint::text) + octet_length(metadata::text) AS bytes`,
              [thread, [...ids], head],
            );
            deleted = gone.rows.map((r) => r.checkpoint_id);
            bytesFreed = gone.rows.reduce((sum, r) => sum + Number(r.bytes), 0);
            if (deleted.length > 0) {
              const writes = await client.query<{ bytes: string }>(
                `WITH d AS (DELETE FROM ${t("checkpoint_writes")} WHERE thread_id = $1 AND checkpoint_ns = '' AND checkpoint_id = ANY($2::text[]) RETURNING octet_length(blob) AS bytes)
                 SELECT COALESCE(SUM(bytes), 0)::text AS bytes FROM d`,
                [thread, deleted],
              );
              bytesFreed += Number(writes.rows[0]?.bytes ?? 0);
              const pairs = new Map<string, [string, string]>();
              for (const r of gone.rows) {
                for (const [channel, version] of Object.entries(r.versions ?? {})) pairs.set(`${channel}\u0000${String(version)}`, [channel, String(version)]);
              }
              if (pairs.size > 0) {
                const blobs = await client.query<{ bytes: string }>(
                  `WITH cand AS (SELECT * FROM unnest($2::text[], $3::text[]) AS c(channel, version)),
                   d AS (
                     DELETE FROM ${t("checkpoint_blobs")} b USING cand
                     WHERE b.thread_id = $1 AND b.checkpoint_ns = '' AND b.channel = cand.channel AND b.version = cand.version
                       AND NOT EXISTS (
                         SELECT 1 FROM ${t("checkpoints")} c
                         WHERE c.thread_id = $1 AND c.checkpoint_ns = '' AND c.checkpoint -> 'channel_versions' ->> b.channel = b.version
                       )
                     RETURNING COALESCE(octet_length(b.blob), 0) AS bytes
                   )
                   SELECT COALESCE(SUM(bytes), 0)::text AS bytes FROM d`,
                  [thread, [...pairs.values()].map((p) => p[0]), [...pairs.values()].map((p) => p[1])],
                );
                bytesFreed += Number(blobs.rows[0]?.bytes ?? 0);
              }
            }
          }
          await client.query(options.dryRun ? "ROLLBACK" : "COMMIT");
          return { deleted, bytesFreed };
        } catch (error) {
          await client.query("ROLLBACK").catch(() => {});
          throw error;
        }
      } finally {
        client.release();
      }
    },
    async threadBytes(thread) {
      const { rows } = await pool.query<{ bytes: string }>(
        `SELECT (
           (SELECT COALESCE(SUM(octet_length(checkpoint::text) + octet_length(metadata::text)), 0) FROM ${t("checkpoints")} WHERE thread_id = $1)
         + (SELECT COALESCE(SUM(COALESCE(octet_length(blob), 0)), 0) FROM ${t("checkpoint_blobs")} WHERE thread_id = $1)
         + (SELECT COALESCE(SUM(octet_length(blob)), 0) FROM ${t("checkpoint_writes")} WHERE thread_id = $1)
         )::text AS bytes`,
        [thread],
      );
      return Number(rows[0]?.bytes ?? 0);
    },
  };
}
