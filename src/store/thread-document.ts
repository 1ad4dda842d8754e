import { createHash } from "node:crypto";
import { readFile, stat } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join, resolve } from "node:path";
import type { Checkpoint, SerializerProtocol } from "@langchain/langgraph-checkpoint";
import { z } from "zod";
import { CairnError } from "../errors.ts";

/**
 * The portable form of a thread: one JSON document that `cairn export` writes and `cairn import` reads,
 * so a thread moves between stores (file → Postgres → SQLite → file) and resumes there.
 *
 * A person can read it: the header says what it is and where it came from; each checkpoint lists its
 * metadata, the values its step changed, and its pending writes, as the JSON the store's serializer
 * wrote (only values the serializer did not write as JSON are base64, with their type tag). Channel
 * values are written once per version, as every store keeps them: a checkpoint carries the channels
 * whose version differs from its parent's (every channel when its parent is not in the document) and
 * inherits the others, so a long thread does not repeat its whole state at every step.
 *
 * The checkpoint section carries a SHA-256, so a damaged or hand-edited file is refused before anything
 * is written; artifacts are checked against their own SHA-256. The format has a version of its own: a
 * reader refuses a newer one, naming the cairn that wrote it.
 */

/** The `format` field of a thread document. */
export const THREAD_DOCUMENT_FORMAT = "cairn.thread";
/** The version of the thread document format this cairn writes, and the newest it reads. */
export const THREAD_DOCUMENT_VERSION = 1;
/** The name of the document inside the directory form of an export. */
export const THREAD_DOCUMENT_FILE = "thread.json";

/** This package's version, recorded in every export. */
export const CAIRN_VERSION: string = (createRequire(import.meta.url)("../../package.json") as { version: string }).version;

/** A value the serializer did not write as JSON: its type tag and its bytes. */
export interface TypedValue {
  type: string;
  base64: string;
}

/** A pending write: `value` holds the serializer's JSON, or `type` and `base64` its other output. */
export type ExportedWrite = { task: string; channel: string; value: unknown } | ({ task: string; channel: string } & TypedValue);

/** One checkpoint of an exported thread. */
export interface ExportedCheckpoint {
  /** The checkpoint namespace: "" for the thread itself, else a subgraph's. */
  ns: string;
  id: string;
  /** The parent checkpoint's id; null for a root. */
  parent: string | null;
  /** The checkpoint's metadata (cairn's step, cost and timing ride in `metadata.cairn`). */
  metadata?: unknown;
  /** Set instead of `metadata` when the serializer did not write the metadata as JSON. */
  metadataTyped?: TypedValue;
  /**
   * The values of the channels whose version differs from the parent's (every channel when the parent is
   * not in the document). A changed channel missing here is empty; an unchanged one keeps the parent's value.
   */
  values: Record<string, unknown>;
  /** Changed channels whose values the serializer did not write as JSON. */
  typedValues?: Record<string, TypedValue>;
  /** Task outputs saved against this checkpoint, task by task. */
  writes: ExportedWrite[];
  /** The LangGraph checkpoint without its values: format `v`, `ts`, `channel_versions`, `versions_seen`. */
  checkpoint: Omit<Checkpoint, "channel_values">;
}

/** An artifact the exported state refers to; its bytes inline (`base64`) or in a file beside the document. */
export interface ExportedArtifact {
  sha256: string;
  size: number;
  mediaType: string;
  name?: string;
  /** The bytes, in the single-document form. */
  base64?: string;
  /** The bytes' file, relative to the document (`artifacts/<sha256>.png`), in the directory form. */
  file?: string;
}

/** A thread as `cairn export` writes it. */
export interface ThreadDocument {
  format: typeof THREAD_DOCUMENT_FORMAT;
  version: number;
  /** The cairn that wrote it. */
  cairn: string;
  thread: string;
  /** The kind of store it was exported from. */
  store: string;
  exportedAt: string;
  /** Set when a single checkpoint was exported: it is the imported thread's root. */
  checkpoint?: string;
  /** `sha256:<hex>` of `JSON.stringify(checkpoints)`. */
  checksum: string;
  /** Parent before child. */
  checkpoints: ExportedCheckpoint[];
  artifacts: ExportedArtifact[];
}

// -------------------------------------------------------------------------------------------------
// Values

/** A value as the document holds it: the serializer's JSON, or its other output as base64. */
export type EncodedValue = { json: unknown } | TypedValue;

export async function encodeValue(serde: SerializerProtocol, value: unknown): Promise<EncodedValue> {
  const [type, data] = await serde.dumpsTyped(value);
  const bytes = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
  if (type === "json") {
    try {
      return { json: JSON.parse(bytes.toString("utf8")) };
    } catch {
      // Not JSON after all: kept as bytes with its tag.
    }
  }
  return { type, base64: bytes.toString("base64") };
}

export async function decodeValue(serde: SerializerProtocol, value: EncodedValue): Promise<unknown> {
  if ("json" in value) return serde.loadsTyped("json", JSON.stringify(value.json));
  return serde.loadsTyped(value.type, new Uint8Array(Buffer.from(value.base64, "base64")));
}

/** The checksum a document carries: over its checkpoint section, as JSON without indentation. */
export function checksumOf(checkpoints: unknown): string {
  return `sha256:${createHash("sha256").update(JSON.stringify(checkpoints)).digest("hex")}`;
}

/** Where the directory form keeps an artifact's bytes, relative to the document. */
export function artifactFileName(sha256: string, extension: string): string {
  return `artifacts/${sha256}.${extension}`;
}

// -------------------------------------------------------------------------------------------------
// Reading and validating

const typedValue = z.object({ type: z.string().min(1), base64: z.string() });
const versions = z.record(z.string(), z.union([z.string(), z.number()]));
const exportedWrite = z.union([
  z.object({ task: z.string(), channel: z.string(), value: z.unknown() }).refine((w) => "value" in w, "a write needs `value`, or `type` and `base64`"),
  z.object({ task: z.string(), channel: z.string(), type: z.string().min(1), base64: z.string() }),
]);
const exportedCheckpoint = z
  .object({
    ns: z.string(),
    id: z.string().min(1),
    parent: z.string().min(1).nullable(),
    metadata: z.unknown().optional(),
    metadataTyped: typedValue.optional(),
    values: z.record(z.string(), z.unknown()),
    typedValues: z.record(z.string(), typedValue).optional(),
    writes: z.array(exportedWrite),
    checkpoint: z.looseObject({
      v: z.number(),
      id: z.string(),
      ts: z.string(),
      channel_versions: versions,
      versions_seen: z.record(z.string(), versions),
    }),
  })
  .refine((c) => c.checkpoint.id === c.id, "`checkpoint.id` differs from `id`")
  .refine((c) => "metadata" in c || c.metadataTyped !== undefined, "a checkpoint needs `metadata` or `metadataTyped`");
const exportedArtifact = z
  .object({
    sha256: z.string().regex(/^[0-9a-f]{64}$/, "not a hex SHA-256"),
    size: z.number().int().nonnegative(),
    mediaType: z.string(),
    name: z.string().optional(),
    base64: z.string().optional(),
    file: z
      .string()
      .regex(/^artifacts\/[0-9a-f]{64}\.[A-Za-z0-9]+$/, "must be artifacts/<sha256>.<ext>")
      .optional(),
  })
  .refine((a) => (a.base64 === undefined) !== (a.file === undefined), "an artifact needs exactly one of `base64` and `file`");
const threadDocument = z.object({
  format: z.literal(THREAD_DOCUMENT_FORMAT),
  version: z.number().int().min(1),
  cairn: z.string(),
  thread: z.string().min(1),
  store: z.string(),
  exportedAt: z.string(),
  checkpoint: z.string().optional(),
  checksum: z.string(),
  checkpoints: z.array(exportedCheckpoint).min(1, "no checkpoints"),
  artifacts: z.array(exportedArtifact),
});

/** A thread document checked whole, and where it was read from: what {@link readThreadExport} returns. */
export interface ThreadExport {
  document: ThreadDocument;
  /** For messages: the file it was read from, or "the thread document" for an object. */
  source: string;
  /** Where `file` entries of its artifacts resolve; undefined for a document given as an object. */
  baseDir?: string;
}

export function invalid(source: string, what: string, details: Record<string, unknown> = {}): CairnError {
  return new CairnError(
    "IMPORT_INVALID",
    `${source} cannot be imported: ${what}. Nothing was written. Export the thread again (cairn export <thread> --out <file>) or restore the file from a copy.`,
    { file: source, ...details },
  );
}

/**
 * Read an export written by `cairn export`: a file, or an export directory (its `thread.json`), checked
 * whole (format, version, checksum, structure) before anything uses it and before any store is opened.
 * Pass the result to {@link importThread}.
 *
 * @throws CairnError `IMPORT_INVALID` naming the file and what is wrong with it (truncated, edited,
 *   written by a newer cairn); `INVALID_ARGUMENT` when the path cannot be read.
 *
 * @example
 * ```ts
 * const exported = await readThreadExport("video-001.json");   // fails here on a damaged file
 * const store = await openStore("sqlite:cairn.db");
 * try {
 *   await importThread(store, exported);
 * } finally {
 *   await store.close();
 * }
 * ```
 */
export async function readThreadExport(path: string): Promise<ThreadExport> {
  const given = resolve(path);
  let file = given;
  const info = await stat(given).catch((error: NodeJS.ErrnoException) => {
    throw new CairnError(
      "INVALID_ARGUMENT",
      `${path} cannot be read (${error.code ?? error.message}). Pass a file written by \`cairn export <thread> --out <file>\` or a directory written with \`--out <dir>/\`.`,
      { file: given },
    );
  });
  if (info.isDirectory()) file = join(given, THREAD_DOCUMENT_FILE);
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    if (code === "ENOENT") throw invalid(given, `the directory holds no ${THREAD_DOCUMENT_FILE} (is it an export directory?)`);
    throw new CairnError("INVALID_ARGUMENT", `${file} cannot be read (${code ?? (error as Error).message}).`, { file });
  }
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    const why = text.trim() === "" ? "the file is empty" : `it is not complete JSON (${(error as Error).message}); the file is truncated or damaged`;
    throw invalid(file, why);
  }
  return { document: checkThreadDocument(value, file), source: file, baseDir: dirname(file) };
}

/** Check a parsed document whole; returns it typed. @throws CairnError IMPORT_INVALID */
export function checkThreadDocument(value: unknown, source: string): ThreadDocument {
  if (typeof value !== "object" || value === null || Array.isArray(value)) throw invalid(source, "it is not a JSON object");
  const doc = value as Record<string, unknown>;
  if (doc.format !== THREAD_DOCUMENT_FORMAT) {
    throw invalid(source, `it is not a cairn thread export (its "format" is ${JSON.stringify(doc.format) ?? "missing"}, expected "${THREAD_DOCUMENT_FORMAT}")`);
  }
  if (typeof doc.version === "number" && doc.version > THREAD_DOCUMENT_VERSION) {
    const writer = typeof doc.cairn === "string" ? `cairn ${doc.cairn}` : "a newer cairn";
    throw new CairnError(
      "IMPORT_INVALID",
      `${source} was written by ${writer} in thread format version ${doc.version}; this cairn (${CAIRN_VERSION}) reads format version ${THREAD_DOCUMENT_VERSION}. ` +
        `Import it with ${typeof doc.cairn === "string" ? `cairn ${doc.cairn} or newer` : "a newer cairn"}, or export the thread again with this one.`,
      { file: source, version: doc.version, writer: doc.cairn },
    );
  }
  if (typeof doc.checksum === "string" && Array.isArray(doc.checkpoints)) {
    const actual = checksumOf(doc.checkpoints);
    if (actual !== doc.checksum) {
      throw invalid(source, `its checkpoints do not match their checksum (recorded ${doc.checksum.slice(0, 19)}…, computed ${actual.slice(0, 19)}…): the file was damaged or edited`);
    }
  }
  const parsed = threadDocument.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    const where = issue.path.length ? issue.path.map((p) => (typeof p === "number" ? `[${p}]` : `.${String(p)}`)).join("").replace(/^\./, "") : "the document";
    throw invalid(source, `${where}: ${issue.message}`);
  }
  // The checked document is the original object: zod's output would drop fields this version does not know.
  const checked = value as ThreadDocument;
  const seen = new Set<string>();
  for (const [i, c] of checked.checkpoints.entries()) {
    const key = `${c.ns}\u0000${c.id}`;
    if (seen.has(key)) throw invalid(source, `checkpoint ${c.id} appears twice (checkpoints[${i}])`);
    seen.add(key);
  }
  const indexOf = new Map(checked.checkpoints.map((c, i) => [`${c.ns}\u0000${c.id}`, i]));
  for (const [i, c] of checked.checkpoints.entries()) {
    const p = c.parent === null ? undefined : indexOf.get(`${c.ns}\u0000${c.parent}`);
    if (p !== undefined && p > i) throw invalid(source, `checkpoint ${c.id} comes before its parent ${c.parent} (checkpoints[${i}])`);
  }
  if (checked.checkpoint !== undefined && !checked.checkpoints.some((c) => c.ns === "" && c.id === checked.checkpoint)) {
    throw invalid(source, `it names checkpoint ${checked.checkpoint} but does not hold it`);
  }
  return checked;
}
