import { createHash } from "node:crypto";
import { mkdir, readdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import writeFileAtomic from "write-file-atomic";
import { z } from "zod";
import { CairnError } from "../errors.ts";
import { fsyncDir } from "./fsync.ts";

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

/** Where a store keeps artifacts. `put` returns once the bytes are durable. */
export interface ArtifactStore {
  put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef>;
  /** The bytes, checked against their hash. @throws CairnError CHECKPOINT_CORRUPT, ARTIFACT_NOT_FOUND */
  get(ref: ArtifactRef): Promise<Uint8Array>;
  has(sha256: string): Promise<boolean>;
  /** Where the bytes are, for people: a file path, or a table row. */
  locate(ref: ArtifactRef): string;
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
 * temporary file, fsynced, renamed into place, and the folder fsynced, so a crash leaves either the whole
 * file or none (a leftover temporary file is ignored).
 */
export class FileArtifactStore implements ArtifactStore {
  constructor(readonly dir: string) {}

  locate(ref: ArtifactRef): string {
    return join(this.dir, "artifacts", ref.sha256.slice(0, 2), `${ref.sha256}.${extensionFor(ref.mediaType)}`);
  }

  async put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef> {
    const ref = refFor(bytes, options);
    const path = this.locate(ref);
    const existing = await stat(path).catch(() => undefined);
    // Kept once per hash; a damaged copy is replaced rather than trusted.
    if (existing?.size === ref.size && sha256Of(await readFile(path)) === ref.sha256) return ref;
    const folder = join(this.dir, "artifacts", ref.sha256.slice(0, 2));
    await mkdir(folder, { recursive: true });
    await writeFileAtomic(path, Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength), { fsync: true });
    await fsyncDir(folder);
    return ref;
  }

  async get(ref: ArtifactRef): Promise<Uint8Array> {
    const path = this.locate(ref);
    try {
      return checked(ref, await readFile(path), path);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") throw missing(ref, path);
      throw error;
    }
  }

  async has(sha256: string): Promise<boolean> {
    const names = await readdir(join(this.dir, "artifacts", sha256.slice(0, 2))).catch(() => [] as string[]);
    return names.some((n) => n.startsWith(`${sha256}.`));
  }
}


/** The subset of better-sqlite3 the SQLite artifact table needs. */
interface SqliteDb {
  exec(sql: string): unknown;
  prepare(sql: string): { run(...args: unknown[]): unknown; get(...args: unknown[]): unknown };
}

/** Artifacts in the SQLite store's database: table `cairn_artifacts`, committed with synchronous=FULL. */
export class SqliteArtifactStore implements ArtifactStore {
  constructor(private readonly db: SqliteDb, private readonly file: string) {
    db.exec("CREATE TABLE IF NOT EXISTS cairn_artifacts (sha256 TEXT PRIMARY KEY, media_type TEXT NOT NULL, size INTEGER NOT NULL, data BLOB NOT NULL)");
  }

  locate(ref: ArtifactRef): string {
    return `${this.file} table cairn_artifacts, sha256 ${ref.sha256}`;
  }

  async put(bytes: Uint8Array, options?: PutArtifactOptions): Promise<ArtifactRef> {
    const ref = refFor(bytes, options);
    this.db.prepare("INSERT OR IGNORE INTO cairn_artifacts (sha256, media_type, size, data) VALUES (?, ?, ?, ?)").run(ref.sha256, ref.mediaType, ref.size, Buffer.from(bytes));
    return ref;
  }

  async get(ref: ArtifactRef): Promise<Uint8Array> {
    const row = this.db.prepare("SELECT data FROM cairn_artifacts WHERE sha256 = ?").get(ref.sha256) as { data: Buffer } | undefined;
    if (!row) throw missing(ref, this.locate(ref));
    return checked(ref, new Uint8Array(row.data), this.locate(ref));
  }

  async has(sha256: string): Promise<boolean> {
    return this.db.prepare("SELECT 1 FROM cairn_artifacts WHERE sha256 = ?").get(sha256) !== undefined;
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
    await this.pool.query(`INSERT INTO ${this.table()} (sha256, media_type, size, data) VALUES ($1, $2, $3, $4) ON CONFLICT (sha256) DO NOTHING`, [
      ref.sha256,
      ref.mediaType,
      ref.size,
      Buffer.from(bytes),
    ]);
    return ref;
  }

  async get(ref: ArtifactRef): Promise<Uint8Array> {
    await this.setup();
    const { rows } = await this.pool.query<{ data: Buffer }>(`SELECT data FROM ${this.table()} WHERE sha256 = $1`, [ref.sha256]);
    if (!rows[0]) throw missing(ref, this.locate(ref));
    return checked(ref, new Uint8Array(rows[0].data), this.locate(ref));
  }

  async has(sha256: string): Promise<boolean> {
    await this.setup();
    const { rows } = await this.pool.query(`SELECT 1 FROM ${this.table()} WHERE sha256 = $1`, [sha256]);
    return rows.length > 0;
  }
}
