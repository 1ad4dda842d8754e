import { createHash, randomBytes } from "node:crypto";
import { join } from "node:path";
import { z } from "zod";
import { CairnError } from "../errors.ts";
import { nodeFs, writeAll, type StoreFs } from "./fs.ts";
import { fsyncDir } from "./fsync.ts";
import { storageError } from "./io-errors.ts";

/**
 * Binary outputs of steps (images, audio, video) live beside the checkpoints, never inside them: a step
 * stores the bytes and puts a small reference in the state. Content-addressed, so the same bytes are
 * kept once however many steps, items or threads produce them.
 */

/** What the state holds for an artifact. */
export interface ArtifactRef {
  kind: "cairn.artifact";
  /** Hex SHA-256 of the bytes: the artifact's identity. */
  sha256: string;
  size: number;
  mediaType: string;
  /** A file name for people (`row-2.png`); not unique, not part of the identity. */
  name?: string;
}

/** The zod schema of an {@link ArtifactRef}, for declaring state fields that hold artifacts. */
export const artifactRef = z.object({
  kind: z.literal("cairn.artifact"),
  sha256: z.string().regex(/^[0-9a-f]{64}$/),
  size: z.number().int().nonnegative(),
  mediaType: z.string(),
  name: z.string().optional(),
});

export function isArtifactRef(value: unknown): value is ArtifactRef {
  return typeof value === "object" && value !== null && (value as { kind?: unknown }).kind === "cairn.artifact" && typeof (value as { sha256?: unknown }).sha256 === "string";
}

/** Every artifact reference inside a value, with the path to it (`frames[2]`, `sheet`). */
export function findArtifactRefs(value: unknown, path = ""): { path: string; ref: ArtifactRef }[] {
  if (isArtifactRef(value)) return [{ path, ref: value }];
  if (Array.isArray(value)) return value.flatMap((v, i) => findArtifactRefs(v, `${path}[${i}]`));
  if (typeof value === "object" && value !== null) {
    return Object.entries(value).flatMap(([k, v]) => findArtifactRefs(v, path ? `${path}.${k}` : k));
  }
  return [];
}

export interface PutArtifactOptions {
  /** MIME type; default `application/octet-stream`. */
  mediaType?: string;
  name?: string;
}

/** An artifact as the store holds it, for garbage collection. */
export interface StoredArtifact {
  sha256: string;
  /** Bytes it takes in the store. */
  bytes: number;
  /**
   * When it was last put: its first write, or a later `put` of the same bytes (which touches it). An
   * artifact put by a step that has not checkpointed yet is recent, and artifact GC spares recent ones.
   */
  touchedAt: Date;
}

/** Where a store keeps artifacts. `put` returns once the bytes are durable. */
export interface ArtifactStore {
  /** Store the bytes (once per hash) and mark them as just put. */
  put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef>;
  /** The bytes, checked against their hash. @throws CairnError CHECKPOINT_CORRUPT, ARTIFACT_NOT_FOUND */
  get(ref: ArtifactRef): Promise<Uint8Array>;
  has(sha256: string): Promise<boolean>;
  /** Where the bytes are, for people: a file path, or a table row. */
  locate(ref: ArtifactRef): string;
  /** Every artifact the store holds. */
  list(): Promise<StoredArtifact[]>;
  /**
   * Read an artifact's stored bytes back and hash them: where it is, and what is wrong with it
   * (`problem` undefined when intact). For `cairn verify`.
   */
  check(sha256: string): Promise<{ where: string; problem?: string }[]>;
  /**
   * Remove an artifact, unless it was put after `touchedBefore` (a step may have just put it again).
   * Returns the bytes freed: 0 when nothing was removed.
   */
  delete(sha256: string, options?: { touchedBefore?: Date }): Promise<number>;
}

export function refFor(bytes: Uint8Array, options: PutArtifactOptions = {}): ArtifactRef {
  if (!(bytes instanceof Uint8Array)) {
    throw new CairnError("INVALID_ARGUMENT", `An artifact must be bytes (a Uint8Array or Buffer), got ${bytes === null ? "null" : typeof bytes}.`);
  }
  const ref: ArtifactRef = {
    kind: "cairn.artifact",
    sha256: createHash("sha256").update(bytes).digest("hex"),
    size: bytes.byteLength,
    mediaType: options.mediaType ?? "application/octet-stream",
  };
  if (options.name !== undefined) ref.name = options.name;
  return ref;
}

function sha256Of(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

function checked(ref: ArtifactRef, bytes: Uint8Array, where: string): Uint8Array {
  const sha = sha256Of(bytes);
  if (sha !== ref.sha256) {
    throw new CairnError(
      "CHECKPOINT_CORRUPT",
      `Artifact ${where} is damaged: its bytes hash to sha256:${sha.slice(0, 12)}…, not sha256:${ref.sha256.slice(0, 12)}… as the state records. Restore the file from a backup, or rerun the step that made it (cairn resume --from-step).`,
      { artifact: ref.sha256, file: where },
    );
  }
  return bytes;
}

/** What is wrong with bytes stored under `sha256`, if anything. */
function hashProblem(sha256: string, bytes: Uint8Array): string | undefined {
  if (bytes.byteLength === 0) return "it is empty (0 bytes)";
  const sha = sha256Of(bytes);
  return sha === sha256 ? undefined : `its ${bytes.byteLength} bytes hash to sha256:${sha.slice(0, 12)}…, not the sha256:${sha256.slice(0, 12)}… it is stored under`;
}

function missing(ref: ArtifactRef, where: string): CairnError {
  return new CairnError(
    "ARTIFACT_NOT_FOUND",
    `Artifact sha256:${ref.sha256.slice(0, 12)}…${ref.name ? ` (${ref.name})` : ""} is not in the store (looked for ${where}). It was removed, or the state came from another store; rerun the step that made it (cairn resume --from-step).`,
    { artifact: ref.sha256 },
  );
}

const EXTENSIONS: Record<string, string> = {
  "image/png": "png",
  "image/jpeg": "jpg",
  "image/webp": "webp",
  "image/gif": "gif",
  "audio/wav": "wav",
  "audio/mpeg": "mp3",
  "video/mp4": "mp4",
  "application/json": "json",
  "text/plain": "txt",
  "text/markdown": "md",
};

/** The usual file extension for a media type (`bin` when unknown). */
export function extensionFor(mediaType: string): string {
  return EXTENSIONS[mediaType] ?? "bin";
}

/**
 * Artifacts as real files: `<dir>/artifacts/<aa>/<sha256>.<ext>`, openable with any viewer. Written to a
 * temporary file (`.<sha256>.<ext>.tmp-<random>`), fsynced, renamed into place, and the folder fsynced, so
 * a crash leaves either the whole file or none. A leftover temporary file is never read; artifact GC
 * (`cairn prune`, `gcArtifacts`) removes those older than its grace period.
 */
export class FileArtifactStore implements ArtifactStore {
  /** @param fs For cairn's crash tests only: the file operations to use (see fs.ts). */
  constructor(readonly dir: string, private readonly fs: StoreFs = nodeFs) {}

  locate(ref: ArtifactRef): string {
    return join(this.dir, "artifacts", ref.sha256.slice(0, 2), `${ref.sha256}.${extensionFor(ref.mediaType)}`);
  }

  async put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef> {
    const ref = refFor(bytes, options);
    const path = this.locate(ref);
    const fs = this.fs;
    const existing = await fs.stat(path).catch(() => undefined);
    // Kept once per hash; a damaged copy is replaced rather than trusted. Touched: just put again, so
    // artifact GC treats it as recent until the step's checkpoint refers to it.
    if (existing?.size === ref.size && sha256Of(await fs.readFile(path)) === ref.sha256) {
      const now = new Date();
      await fs.utimes(path, now, now).catch(() => {});
      return ref;
    }
    const folder = join(this.dir, "artifacts", ref.sha256.slice(0, 2));
    const tmp = join(folder, `.${ref.sha256}.${extensionFor(ref.mediaType)}.tmp-${randomBytes(6).toString("hex")}`);
    let synced = false;
    try {
      await fs.mkdir(folder);
      const handle = await fs.open(tmp, "wx");
      try {
        await writeAll(handle, bytes, 0);
        synced = true;
        await handle.sync();
        synced = false;
      } finally {
        await handle.close();
      }
      await fs.rename(tmp, path);
      synced = true;
      await fsyncDir(folder, fs);
    } catch (error) {
      await fs.unlink(tmp).catch(() => {});
      throw storageError(error, {
        file: path,
        what: `storing artifact ${ref.name ?? `sha256:${ref.sha256.slice(0, 12)}…`} (${ref.size} bytes)`,
        synced,
        intact: "the checkpoints saved before it are intact",
      });
    }
    return ref;
  }

  /**
   * Remove temporary files of artifact writes a crash cut short, last changed before `before` (a put
   * under way in another process is newer). Returns the bytes freed.
   */
  async removeTemporaryFiles(before: Date): Promise<number> {
    const root = join(this.dir, "artifacts");
    let freed = 0;
    for (const folder of await this.fs.readdir(root).catch(() => [] as string[])) {
      if (!/^[0-9a-f]{2}$/.test(folder)) continue;
      for (const name of await this.fs.readdir(join(root, folder)).catch(() => [] as string[])) {
        if (!/^\.[0-9a-f]{64}\.[A-Za-z0-9]+\.tmp-[0-9a-f]+$/.test(name)) continue;
        const path = join(root, folder, name);
        const s = await this.fs.stat(path).catch(() => undefined);
        if (!s || s.mtime >= before) continue;
        await this.fs.unlink(path).then(() => (freed += s.size)).catch(() => {});
      }
    }
    return freed;
  }

  async get(ref: ArtifactRef): Promise<Uint8Array> {
    const path = this.locate(ref);
    try {
      return checked(ref, await this.fs.readFile(path), path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") throw missing(ref, path);
      throw error;
    }
  }

  async check(sha256: string): Promise<{ where: string; problem?: string }[]> {
    const folder = join(this.dir, "artifacts", sha256.slice(0, 2));
    const out: { where: string; problem?: string }[] = [];
    for (const name of await this.fs.readdir(folder).catch(() => [] as string[])) {
      if (!new RegExp(`^${sha256}\\.[A-Za-z0-9]+$`).test(name)) continue;
      const where = join(folder, name);
      const problem = hashProblem(sha256, await this.fs.readFile(where));
      out.push(problem ? { where, problem } : { where });
    }
    return out;
  }

  async has(sha256: string): Promise<boolean> {
    const names = await this.fs.readdir(join(this.dir, "artifacts", sha256.slice(0, 2))).catch(() => [] as string[]);
    return names.some((n) => n.startsWith(`${sha256}.`));
  }

  async list(): Promise<StoredArtifact[]> {
    const root = join(this.dir, "artifacts");
    const out: StoredArtifact[] = [];
    for (const folder of await this.fs.readdir(root).catch(() => [] as string[])) {
      if (!/^[0-9a-f]{2}$/.test(folder)) continue;
      for (const name of await this.fs.readdir(join(root, folder)).catch(() => [] as string[])) {
        // `<sha256>.<ext>` only: temporary files start with a dot.
        const m = /^([0-9a-f]{64})\.[A-Za-z0-9]+$/.exec(name);
        if (!m) continue;
        const s = await this.fs.stat(join(root, folder, name)).catch(() => undefined);
        if (s) out.push({ sha256: m[1]!, bytes: s.size, touchedAt: s.mtime });
      }
    }
    return out;
  }

  async delete(sha256: string, options: { touchedBefore?: Date } = {}): Promise<number> {
    if (!/^[0-9a-f]{64}$/.test(sha256)) return 0;
    const folder = join(this.dir, "artifacts", sha256.slice(0, 2));
    let freed = 0;
    for (const name of await this.fs.readdir(folder).catch(() => [] as string[])) {
      if (!new RegExp(`^${sha256}\\.[A-Za-z0-9]+$`).test(name)) continue;
      const path = join(folder, name);
      const s = await this.fs.stat(path).catch(() => undefined);
      if (!s || (options.touchedBefore && s.mtime > options.touchedBefore)) continue;
      try {
        await this.fs.unlink(path);
        freed += s.size;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
      }
    }
    // The folder itself stays: a concurrent put may be about to write into it.
    return freed;
  }
}


/** The subset of better-sqlite3 the SQLite artifact table needs. */
interface SqliteDb {
  exec(sql: string): unknown;
  prepare(sql: string): { run(...args: unknown[]): { changes: number | bigint }; get(...args: unknown[]): unknown; all(...args: unknown[]): unknown[] };
}

/**
 * Artifacts in the SQLite store's database: table `cairn_artifacts`, committed with synchronous=FULL.
 * `touched_at` (milliseconds since the epoch; added to tables made before it, where it starts empty and
 * such rows count as old) is when the bytes were last put.
 */
export class SqliteArtifactStore implements ArtifactStore {
  constructor(private readonly db: SqliteDb, private readonly file: string) {
    db.exec("CREATE TABLE IF NOT EXISTS cairn_artifacts (sha256 TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL, touched_at INTEGER)");
    const columns = db.prepare("SELECT name FROM pragma_table_info('cairn_artifacts')").all() as { name: string }[];
    if (!columns.some((c) => c.name === "touched_at")) {
      try {
        db.exec("ALTER TABLE cairn_artifacts ADD COLUMN touched_at INTEGER");
      } catch (error) {
        // Another process added it meanwhile.
        if (!/duplicate column/i.test((error as Error).message)) throw error;
      }
    }
  }

  locate(ref: ArtifactRef): string {
    return `${this.file} table cairn_artifacts, sha256 ${ref.sha256}`;
  }

  async put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef> {
    const ref = refFor(bytes, options);
    this.db
      .prepare("INSERT INTO cairn_artifacts (sha256, media_type, size, data, touched_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO UPDATE SET touched_at = excluded.touched_at")
      .run(ref.sha256, ref.mediaType, ref.size, Buffer.from(bytes), Date.now());
    return ref;
  }

  async get(ref: ArtifactRef): Promise<Uint8Array> {
    const row = this.db.prepare("SELECT data FROM cairn_artifacts WHERE sha256 = ?").get(ref.sha256) as { data: Buffer } | undefined;
    if (!row) throw missing(ref, this.locate(ref));
    return checked(ref, new Uint8Array(row.data), this.locate(ref));
  }

  async check(sha256: string): Promise<{ where: string; problem?: string }[]> {
    const row = this.db.prepare("SELECT data FROM cairn_artifacts WHERE sha256 = ?").get(sha256) as { data: Buffer } | undefined;
    if (!row) return [];
    const where = `cairn_artifacts row ${sha256.slice(0, 12)}…`;
    const problem = hashProblem(sha256, new Uint8Array(row.data));
    return [problem ? { where, problem } : { where }];
  }

  async has(sha256: string): Promise<boolean> {
    return this.db.prepare("SELECT 1 FROM cairn_artifacts WHERE sha256 = ?").get(sha256) !== undefined;
  }

  async list(): Promise<StoredArtifact[]> {
    const rows = this.db.prepare("SELECT sha256, length(data) AS bytes, touched_at FROM cairn_artifacts").all() as { sha256: string; bytes: number; touched_at: number | null }[];
    return rows.map((r) => ({ sha256: r.sha256, bytes: Number(r.bytes), touchedAt: new Date(r.touched_at ?? 0) }));
  }

  async delete(sha256: string, options: { touchedBefore?: Date } = {}): Promise<number> {
    const row = this.db.prepare("SELECT length(data) AS bytes FROM cairn_artifacts WHERE sha256 = ?").get(sha256) as { bytes: number } | undefined;
    if (!row) return 0;
    const before = options.touchedBefore?.getTime() ?? Number.MAX_SAFE_INTEGER;
    // One statement decides and deletes: a put that touched the row meanwhile keeps it.
    const { changes } = this.db.prepare("DELETE FROM cairn_artifacts WHERE sha256 = ? AND COALESCE(touched_at, 0) <= ?").run(sha256, before);
    return Number(changes) > 0 ? Number(row.bytes) : 0;
  }
}

/** The subset of pg.Pool the Postgres artifact table needs. */
interface PgQueryable {
  query<R = Record<string, unknown>>(sql: string, params?: unknown[]): Promise<{ rows: R[] }>;
}

/** Artifacts in Postgres: table `cairn_artifacts` in the store's schema. */
export class PostgresArtifactStore implements ArtifactStore {
  private ready: Promise<unknown> | undefined;

  constructor(private readonly pool: PgQueryable, private readonly schema: string, private readonly display: string) {}

  private table(): string {
    return `"${this.schema}".cairn_artifacts`;
  }

  private setup(): Promise<unknown> {
    this.ready ??= this.pool
      .query(`CREATE TABLE IF NOT EXISTS ${this.table()} (sha256 TEXT PRIMARY KEY, media_type TEXT NOT NULL, size BIGINT NOT NULL, data BYTEA NOT NULL)`)
      // When the bytes were last put (tables made before it start empty there: such rows count as old).
      // Looked up first: ALTER TABLE locks the table even when the column is there.
      .then(() =>
        this.pool.query(
          `SELECT 1 FROM information_schema.columns WHERE table_schema = $1 AND table_name = 'cairn_artifacts' AND column_name = 'touched_at'`,
          [this.schema],
        ),
      )
      .then(({ rows }) => (rows.length ? undefined : this.pool.query(`ALTER TABLE ${this.table()} ADD COLUMN IF NOT EXISTS touched_at TIMESTAMPTZ`)))
      .catch((error: unknown) => {
        // Not remembered: the next use tries again (the server may be back).
        this.ready = undefined;
        throw error;
      });
    return this.ready;
  }

  locate(ref: ArtifactRef): string {
    return `${this.display} table ${this.schema}.cairn_artifacts, sha256 ${ref.sha256}`;
  }

  async put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef> {
    const ref = refFor(bytes, options);
    await this.setup();
    await this.pool.query(
      `INSERT INTO ${this.table()} (sha256, media_type, size, data, touched_at) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sha256) DO UPDATE SET touched_at = EXCLUDED.touched_at`,
      [ref.sha256, ref.mediaType, ref.size, Buffer.from(bytes), new Date()],
    );
    return ref;
  }

  async get(ref: ArtifactRef): Promise<Uint8Array> {
    await this.setup();
    const { rows } = await this.pool.query<{ data: Buffer }>(`SELECT data FROM ${this.table()} WHERE sha256 = $1`, [ref.sha256]);
    if (!rows[0]) throw missing(ref, this.locate(ref));
    return checked(ref, new Uint8Array(rows[0].data), this.locate(ref));
  }

  async check(sha256: string): Promise<{ where: string; problem?: string }[]> {
    await this.setup();
    const { rows } = await this.pool.query<{ data: Buffer }>(`SELECT data FROM ${this.table()} WHERE sha256 = $1`, [sha256]);
    if (!rows[0]) return [];
    const where = `${this.table()} row ${sha256.slice(0, 12)}…`;
    const problem = hashProblem(sha256, new Uint8Array(rows[0].data));
    return [problem ? { where, problem } : { where }];
  }

  async has(sha256: string): Promise<boolean> {
    await this.setup();
    const { rows } = await this.pool.query(`SELECT 1 FROM ${this.table()} WHERE sha256 = $1`, [sha256]);
    return rows.length > 0;
  }

  async list(): Promise<StoredArtifact[]> {
    await this.setup();
    const { rows } = await this.pool.query<{ sha256: string; bytes: string; touched_at: Date | null }>(
      `SELECT sha256, octet_length(data)::text AS bytes, touched_at FROM ${this.table()}`,
    );
    return rows.map((r) => ({ sha256: r.sha256, bytes: Number(r.bytes), touchedAt: r.touched_at ?? new Date(0) }));
  }

  async delete(sha256: string, options: { touchedBefore?: Date } = {}): Promise<number> {
    await this.setup();
    // One statement decides and deletes: a put that touched the row meanwhile keeps it.
    const { rows } = await this.pool.query<{ bytes: string }>(
      `DELETE FROM ${this.table()} WHERE sha256 = $1 AND ($2::timestamptz IS NULL OR COALESCE(touched_at, 'epoch'::timestamptz) <= $2) RETURNING octet_length(data)::text AS bytes`,
      [sha256, options.touchedBefore ?? null],
    );
    return rows.reduce((sum, r) => sum + Number(r.bytes), 0);
  }
}
