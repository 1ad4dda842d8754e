import { randomBytes } from "node:crypto";
import { mkdir, rm, stat, unlink } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import type { BaseCheckpointSaver, CheckpointTuple } from "@langchain/langgraph-checkpoint";
import writeFileAtomic from "write-file-atomic";
import { CairnError } from "../errors.ts";
import { extensionFor, findArtifactRefs, type ArtifactRef, type ArtifactStore } from "../store/artifacts.ts";
import {
  artifactFileName,
  CAIRN_VERSION,
  checksumOf,
  encodeValue,
  THREAD_DOCUMENT_FILE,
  THREAD_DOCUMENT_FORMAT,
  THREAD_DOCUMENT_VERSION,
  type ExportedArtifact,
  type ExportedCheckpoint,
  type ExportedWrite,
  type ThreadDocument,
} from "../store/thread-document.ts";
import { checkCheckpointId, checkpointNotFound, latestTuple } from "./history.ts";

/*
 * Exporting a thread: a read of any saver and its artifact store, turned into the portable document of
 * store/thread-document.ts. It belongs with the readers: it writes nothing to the store, only the
 * export's own file or directory, and that only once everything has been read (a missing artifact or an
 * unknown checkpoint leaves no partial export behind). The import, which writes to a store, lives in
 * store/import.ts.
 */

/** Above this many bytes of artifacts, a thread is exported to a directory, not one JSON document. */
export const EXPORT_INLINE_LIMIT = 32 * 1024 * 1024;

/** What an export reads: a store's saver and artifacts, its URI for messages and its kind for the document. */
export interface ExportSource {
  saver: BaseCheckpointSaver;
  artifacts: ArtifactStore;
  uri: string;
  kind: string;
}

/** What to export and how: {@link exportThread}, {@link writeThreadExport}. */
export interface ExportOptions {
  /** Export only this checkpoint (of the thread's root namespace) and its pending writes: it becomes the imported thread's root. */
  checkpoint?: string;
  /** Refuse a single document whose artifacts exceed this many bytes. @default EXPORT_INLINE_LIMIT (32 MiB) */
  maxInlineBytes?: number;
  /** The export time recorded in the document. @default now */
  now?: () => Date;
}

/** What an export wrote. */
export interface ExportSummary {
  thread: string;
  /** The file written, or the directory's `thread.json`. */
  path: string;
  form: "file" | "directory";
  checkpoints: number;
  /** Pending writes (saved task outputs) exported with their checkpoints. */
  writes: number;
  artifacts: { count: number; bytes: number };
  /** The checkpoint exported alone, when one was. */
  checkpoint?: string;
}

/**
 * A thread as one JSON document, artifacts inline (base64): every checkpoint of every branch with its
 * metadata and pending writes, parent before child; with `checkpoint`, that checkpoint alone. Write it
 * with `JSON.stringify(doc, null, 2)`; load it into any store with {@link importThread}.
 *
 * @throws CairnError `THREAD_NOT_FOUND`, `CHECKPOINT_NOT_FOUND`; `ARTIFACT_NOT_FOUND` naming an
 *   artifact the state refers to that the store lacks; `INVALID_ARGUMENT` when the artifacts exceed
 *   `maxInlineBytes` (export to a directory with {@link writeThreadExport} instead).
 *
 * @example
 * ```ts
 * const store = await openStore("file:.cairn");
 * try {
 *   const doc = await exportThread(store, "video-001");
 *   await writeFile("video-001.json", JSON.stringify(doc, null, 2));
 * } finally {
 *   await store.close();
 * }
 * ```
 */
export async function exportThread(store: ExportSource, thread: string, options: ExportOptions = {}): Promise<ThreadDocument> {
  const collected = await collect(store, thread, options);
  refuseLarge(collected, thread, options.maxInlineBytes ?? EXPORT_INLINE_LIMIT);
  const artifacts: ExportedArtifact[] = [];
  for (const ref of collected.refs) {
    artifacts.push({ ...describe(ref), base64: Buffer.from(await store.artifacts.get(ref)).toString("base64") });
  }
  return { ...collected.document, artifacts };
}

/**
 * Export a thread to `out`: a directory when `out` ends with `/` or is an existing directory
 * (`<out>/thread.json` and `<out>/artifacts/<sha256>.<ext>`, for threads with large artifacts), else one
 * JSON file with the artifacts inline. Nothing is left behind when the export fails.
 *
 * @example
 * ```ts
 * const summary = await writeThreadExport(store, "sprites-7", "exports/sprites-7/");
 * console.log(`${summary.checkpoints} checkpoints, ${summary.artifacts.count} artifacts in ${summary.path}`);
 * ```
 */
export async function writeThreadExport(store: ExportSource, thread: string, out: string, options: ExportOptions = {}): Promise<ExportSummary> {
  const target = resolve(out);
  const isDir = /[/\\]$/.test(out) || (await stat(target).then((s) => s.isDirectory()).catch(() => false));
  if (!isDir) {
    const document = await exportThread(store, thread, options);
    await mkdir(dirname(target), { recursive: true });
    await writeFileAtomic(target, `${JSON.stringify(document, null, 2)}\n`);
    return summarize(document, target, "file");
  }

  const collected = await collect(store, thread, options);
  const existed = await stat(target).then(() => true).catch(() => false);
  const created: string[] = [];
  try {
    await mkdir(join(target, "artifacts"), { recursive: true });
    const artifacts: ExportedArtifact[] = [];
    for (const ref of collected.refs) {
      const file = artifactFileName(ref.sha256, extensionFor(ref.mediaType));
      const path = join(target, file);
      const bytes = await store.artifacts.get(ref);
      if (!(await stat(path).then((s) => s.size === bytes.byteLength).catch(() => false))) {
        created.push(path);
        await writeFileAtomic(path, Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength));
      }
      artifacts.push({ ...describe(ref), file });
    }
    const document = { ...collected.document, artifacts };
    // The document last: a directory holding a thread.json holds everything it refers to.
    await writeFileAtomic(join(target, THREAD_DOCUMENT_FILE), `${JSON.stringify(document, null, 2)}\n`);
    return summarize(document, join(target, THREAD_DOCUMENT_FILE), "directory");
  } catch (error) {
    for (const path of created) await unlink(path).catch(() => {});
    if (!existed) await rm(target, { recursive: true, force: true });
    throw error;
  }
}

function summarize(document: ThreadDocument, path: string, form: ExportSummary["form"]): ExportSummary {
  return {
    thread: document.thread,
    path,
    form,
    checkpoints: document.checkpoints.length,
    writes: document.checkpoints.reduce((n, c) => n + c.writes.length, 0),
    artifacts: { count: document.artifacts.length, bytes: document.artifacts.reduce((n, a) => n + a.size, 0) },
    ...(document.checkpoint === undefined ? {} : { checkpoint: document.checkpoint }),
  };
}

function describe(ref: ArtifactRef): ExportedArtifact {
  return { sha256: ref.sha256, size: ref.size, mediaType: ref.mediaType, ...(ref.name === undefined ? {} : { name: ref.name }) };
}

function refuseLarge(collected: Collected, thread: string, limit: number): void {
  const bytes = collected.refs.reduce((n, r) => n + r.size, 0);
  if (bytes <= limit) return;
  throw new CairnError(
    "INVALID_ARGUMENT",
    `Thread "${thread}" refers to ${mib(bytes)} of artifacts (${collected.refs.length} files), more than the ${mib(limit)} one JSON document holds. ` +
      `Export it to a directory instead, which keeps artifacts as files: cairn export ${thread} --out <dir>/`,
    { thread, bytes, limit },
  );
}

const mib = (n: number) => `${(n / 1024 / 1024).toFixed(1)} MiB`;

// -------------------------------------------------------------------------------------------------
// Reading the thread

interface Collected {
  /** The document without its artifacts. */
  document: Omit<ThreadDocument, "artifacts">;
  /** Each artifact the exported state and writes refer to, once, in order of first reference. */
  refs: ArtifactRef[];
}

async function collect(store: ExportSource, thread: string, options: ExportOptions): Promise<Collected> {
  checkCheckpointId(thread, options.checkpoint);
  await latestTuple(store.saver, thread, store.uri);
  let tuples: CheckpointTuple[];
  if (options.checkpoint !== undefined) {
    const tuple = await store.saver.getTuple({ configurable: { thread_id: thread, checkpoint_ns: "", checkpoint_id: options.checkpoint } });
    if (!tuple) throw checkpointNotFound(thread, options.checkpoint, store.uri);
    tuples = [tuple];
  } else {
    tuples = [];
    // Every namespace: the thread's own ("") and any subgraph's.
    for await (const t of store.saver.list({ configurable: { thread_id: thread } })) tuples.push(t);
  }
  const ordered = parentsFirst(tuples);
  const byKey = new Map(ordered.map((t) => [keyOf(t), t]));
  const refs = new Map<string, { ref: ArtifactRef; where: string }>();
  const note = (value: unknown, where: (path: string) => string, channel: string) => {
    for (const { path, ref } of findArtifactRefs(value, channel)) if (!refs.has(ref.sha256)) refs.set(ref.sha256, { ref, where: where(path) });
  };

  const checkpoints: ExportedCheckpoint[] = [];
  for (const t of ordered) {
    const ns = nsOf(t);
    const id = t.checkpoint.id;
    const parentId = options.checkpoint !== undefined ? null : ((t.parentConfig?.configurable?.checkpoint_id as string | undefined) ?? null);
    const parent = parentId === null ? undefined : byKey.get(`${ns}\u0000${parentId}`);
    const { channel_values, ...rest } = t.checkpoint;
    const values: Record<string, unknown> = {};
    const typedValues: Record<string, { type: string; base64: string }> = {};
    for (const [channel, value] of Object.entries(channel_values as Record<string, unknown>)) {
      // A channel whose version is the parent's holds the parent's value: written once, with the parent.
      const version = t.checkpoint.channel_versions[channel];
      if (parent && version !== undefined && parent.checkpoint.channel_versions[channel] === version && channel in parent.checkpoint.channel_values) continue;
      const encoded = await encodeValue(store.saver.serde, value);
      if ("json" in encoded) values[channel] = encoded.json;
      else typedValues[channel] = encoded;
      note(value, (path) => `${path} at checkpoint ${id}`, channel);
    }
    const writes: ExportedWrite[] = [];
    for (const [task, channel, value] of t.pendingWrites ?? []) {
      const encoded = await encodeValue(store.saver.serde, value);
      writes.push("json" in encoded ? { task, channel, value: encoded.json } : { task, channel, ...encoded });
      note(value, (path) => `${path} in a pending write of checkpoint ${id}`, channel);
    }
    const metadata = await encodeValue(store.saver.serde, t.metadata);
    checkpoints.push({
      ns,
      id,
      parent: parentId,
      ...("json" in metadata ? { metadata: metadata.json } : { metadataTyped: metadata }),
      values,
      ...(Object.keys(typedValues).length ? { typedValues } : {}),
      writes,
      checkpoint: rest,
    });
  }

  const missing: string[] = [];
  for (const { ref, where } of refs.values()) {
    if (!(await store.artifacts.has(ref.sha256))) missing.push(`sha256:${ref.sha256.slice(0, 12)}…${ref.name ? ` (${ref.name})` : ""}, referenced by ${where}, looked for at ${store.artifacts.locate(ref)}`);
  }
  if (missing.length > 0) {
    throw new CairnError(
      "ARTIFACT_NOT_FOUND",
      `Cannot export thread "${thread}": ${missing.length === 1 ? "an artifact it refers to is" : `${missing.length} artifacts it refers to are`} not in store ${store.uri}: ${missing.join("; ")}. ` +
        `Nothing was written. Restore the artifact, rerun the step that made it (cairn resume <graph.ts> --thread ${thread} --from-step <step>), or export an earlier checkpoint with --checkpoint <id>.`,
      { thread, store: store.uri, artifacts: [...refs.values()].map((r) => r.ref.sha256) },
    );
  }

  const document: Omit<ThreadDocument, "artifacts"> = {
    format: THREAD_DOCUMENT_FORMAT,
    version: THREAD_DOCUMENT_VERSION,
    cairn: CAIRN_VERSION,
    thread,
    store: store.kind,
    exportedAt: (options.now?.() ?? new Date()).toISOString(),
    ...(options.checkpoint === undefined ? {} : { checkpoint: options.checkpoint }),
    checksum: checksumOf(checkpoints),
    checkpoints,
  };
  return { document, refs: [...refs.values()].map((r) => r.ref) };
}

const nsOf = (t: CheckpointTuple) => (t.config.configurable?.checkpoint_ns as string | undefined) ?? "";
const keyOf = (t: CheckpointTuple) => `${nsOf(t)}\u0000${t.checkpoint.id}`;

/**
 * The thread's namespace first, then subgraphs'; within each, parents before children, and siblings
 * oldest first (checkpoint ids sort by time). A parent missing from the store does not hold its child back.
 */
function parentsFirst(tuples: CheckpointTuple[]): CheckpointTuple[] {
  const sorted = [...tuples].sort((a, b) => {
    const na = nsOf(a);
    const nb = nsOf(b);
    if (na !== nb) return na < nb ? -1 : 1;
    return a.checkpoint.id < b.checkpoint.id ? -1 : a.checkpoint.id > b.checkpoint.id ? 1 : 0;
  });
  const present = new Set(sorted.map(keyOf));
  const children = new Map<string, CheckpointTuple[]>();
  const roots: CheckpointTuple[] = [];
  for (const t of sorted) {
    const parent = t.parentConfig?.configurable?.checkpoint_id as string | undefined;
    const pk = parent === undefined ? undefined : `${nsOf(t)}\u0000${parent}`;
    if (pk === undefined || !present.has(pk)) roots.push(t);
    else children.set(pk, [...(children.get(pk) ?? []), t]);
  }
  const out: CheckpointTuple[] = [];
  // Take, again and again, the lowest-id checkpoint whose parent is already out (few are ever waiting:
  // one per branch).
  const ready = [...roots];
  while (ready.length > 0) {
    ready.sort((a, b) => (keyOf(a) < keyOf(b) ? -1 : keyOf(a) > keyOf(b) ? 1 : 0));
    const next = ready.shift()!;
    out.push(next);
    ready.push(...(children.get(keyOf(next)) ?? []));
  }
  if (out.length < sorted.length) {
    const stuck = sorted.find((t) => !out.includes(t))!;
    throw new CairnError(
      "CHECKPOINT_CORRUPT",
      `Checkpoint ${stuck.checkpoint.id} of thread "${stuck.config.configurable?.thread_id}" is its own ancestor (its parents form a cycle); the store is damaged and the thread cannot be exported.`,
      { thread: stuck.config.configurable?.thread_id as string, checkpoint: stuck.checkpoint.id },
    );
  }
  return out;
}
