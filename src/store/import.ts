import { createHash } from "node:crypto";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import type { BaseCheckpointSaver, ChannelVersions, Checkpoint, CheckpointMetadata, PendingWrite } from "@langchain/langgraph-checkpoint";
import { CairnError, isCairnError } from "../errors.ts";
import { findArtifactRefs, type ArtifactRef, type ArtifactStore } from "./artifacts.ts";
import {
  checkThreadDocument,
  decodeValue,
  invalid,
  readThreadExport,
  type ExportedArtifact,
  type ExportedCheckpoint,
  type ThreadExport,
  type ThreadDocument,
} from "./thread-document.ts";

/*
 * Loading an exported thread into a store. It lives with the stores because it writes through the
 * saver and the artifact store alone: it knows nothing of workflows, and reads nothing but the document.
 *
 * All or nothing: the whole document is read, checked and decoded (every value, every artifact's bytes
 * against its hash) before the first write, so bad input leaves the store untouched; a write that fails
 * midway deletes the partly imported thread before the error is reported.
 */

/** Where a thread is imported: a store's saver and artifact store, and its URI for messages. */
export interface ImportTarget {
  saver: BaseCheckpointSaver;
  artifacts: ArtifactStore;
  uri: string;
}

/** How to import: {@link importThread}. */
export interface ImportOptions {
  /** The thread's id in the target store; default the exported thread's id. Must not exist there yet. */
  thread?: string;
}

/** What an import wrote. */
export interface ImportSummary {
  /** The thread's id in the target store. */
  thread: string;
  /** The target store's URI. */
  store: string;
  /** Where the document came from: its file, the thread's id and store kind there, and who exported it when. */
  from: { source: string; thread: string; store: string; cairn: string; exportedAt: string; checkpoint?: string };
  checkpoints: number;
  /** Pending writes (saved task outputs) imported with their checkpoints. */
  writes: number;
  /** Distinct artifacts in the document, their bytes, and how many the store did not have yet. */
  artifacts: { count: number; bytes: number; added: number };
}

/** One checkpoint ready to be put: every value decoded, versions still the source store's. */
interface Planned {
  ns: string;
  id: string;
  parent: string | null;
  parentPlanned: Planned | undefined;
  checkpoint: Checkpoint;
  metadata: CheckpointMetadata;
  writes: Map<string, PendingWrite[]>;
  writeCount: number;
}

/**
 * Load a thread exported by `cairn export` (or {@link exportThread}) into a store, where `cairn resume`
 * continues it exactly where it stood and `cairn history` shows the same steps, spend and checkpoint ids.
 *
 * `from` is a file, an export directory (its `thread.json` and `artifacts/`), what
 * {@link readThreadExport} read, or a document object (whose artifacts must be inline). Channel versions are minted again by the target store, in their
 * original order, since each store has its own kind of version.
 *
 * @throws CairnError `IMPORT_INVALID` for a damaged, truncated, edited or newer document (nothing is
 *   written); `THREAD_EXISTS` when the thread id is taken (pass `thread` to rename); the store's error
 *   when a write fails, after the partly imported thread was deleted.
 *
 * @example
 * ```ts
 * const store = await openStore("sqlite:runs/cairn.db");
 * try {
 *   const imported = await importThread(store, "video-001.json", { thread: "video-001-copy" });
 *   console.log(`${imported.checkpoints} checkpoints in ${imported.store}`);
 * } finally {
 *   await store.close();
 * }
 * ```
 */
export async function importThread(store: ImportTarget, from: string | ThreadExport | ThreadDocument, options: ImportOptions = {}): Promise<ImportSummary> {
  let loaded: ThreadExport;
  if (typeof from === "string") loaded = await readThreadExport(from);
  else if ("document" in from) loaded = { ...from, document: checkThreadDocument(from.document, from.source) };
  else loaded = { document: checkThreadDocument(from, "the thread document"), source: "the thread document" };
  const doc = loaded.document;
  const thread = options.thread ?? doc.thread;
  checkThreadId(thread);
  const { planned, refs } = await plan(store.saver, loaded);
  const artifacts = await checkArtifacts(loaded, refs);

  for await (const _ of store.saver.list({ configurable: { thread_id: thread } }, { limit: 1 })) {
    const source = typeof from === "string" ? from : loaded.baseDir ? loaded.source : "<file>";
    throw new CairnError(
      "THREAD_EXISTS",
      `Thread "${thread}" already exists in store ${store.uri}; an import never writes into an existing thread. ` +
        `Import it under another id: cairn import ${source} --thread <new-id> --store ${store.uri}`,
      { thread, store: store.uri },
    );
  }

  const versioned = remintVersions(store.saver, planned);
  let added = 0;
  let bytes = 0;
  let at = 0;
  let started = false;
  try {
    // Artifacts first: once a checkpoint is in the store, so are the bytes it refers to.
    for (const a of artifacts) {
      const data = await a.bytes();
      bytes += data.byteLength;
      if (!(await store.artifacts.has(a.entry.sha256))) added += 1;
      await store.artifacts.put(data, { mediaType: a.entry.mediaType, name: a.entry.name });
    }
    // Parent before child, each checkpoint followed by its writes, as a run would have written them.
    for (const c of versioned) {
      at += 1;
      started = true;
      const config = { configurable: { thread_id: thread, checkpoint_ns: c.ns, ...(c.parent === null ? {} : { checkpoint_id: c.parent }) } };
      await store.saver.put(config, c.checkpoint, c.metadata, c.newVersions);
      const own = { configurable: { thread_id: thread, checkpoint_ns: c.ns, checkpoint_id: c.id } };
      for (const [task, writes] of c.writes) await store.saver.putWrites(own, writes, task);
    }
  } catch (error) {
    let cleanup = "The partly imported thread was deleted; the store holds nothing of it.";
    if (started) {
      try {
        await store.saver.deleteThread(thread);
      } catch (deleteError) {
        cleanup = `Deleting the partly imported thread failed too (${(deleteError as Error).message}): remove thread "${thread}" from the store before importing again.`;
      }
    } else {
      cleanup = "No checkpoint was written (artifacts stored so far stay: they are kept by hash and only take space).";
    }
    const message = (error instanceof Error ? error.message : String(error)).replace(/\.$/, "");
    const where = started ? `at checkpoint ${at} of ${versioned.length} (${versioned[at - 1]!.id})` : "while storing its artifacts";
    throw new CairnError(
      isCairnError(error) ? error.code : "STORE_UNAVAILABLE",
      `Importing thread "${thread}" into ${store.uri} failed ${where}: ${message}. ${cleanup} Run the import again once the store works.`,
      { thread, store: store.uri, file: loaded.source },
      { cause: error },
    );
  }
  return {
    thread,
    store: store.uri,
    from: {
      source: loaded.source,
      thread: doc.thread,
      store: doc.store,
      cairn: doc.cairn,
      exportedAt: doc.exportedAt,
      ...(doc.checkpoint === undefined ? {} : { checkpoint: doc.checkpoint }),
    },
    checkpoints: versioned.length,
    writes: versioned.reduce((n, c) => n + c.writeCount, 0),
    artifacts: { count: artifacts.length, bytes, added },
  };
}

function checkThreadId(thread: string): void {
  if (typeof thread !== "string" || thread.length === 0 || thread.length > 200 || /[\u0000-\u001f]/.test(thread)) {
    throw new CairnError("INVALID_ARGUMENT", `Invalid thread id ${JSON.stringify(thread)}: use 1–200 printable characters (--thread <new-id>).`, { thread });
  }
}

// -------------------------------------------------------------------------------------------------
// Decoding (no writes)

/** Every checkpoint decoded, with its full values rebuilt from its parent's; and the artifacts they refer to. */
async function plan(saver: BaseCheckpointSaver, loaded: ThreadExport): Promise<{ planned: Planned[]; refs: Map<string, { ref: ArtifactRef; where: string }> }> {
  const { document: doc, source } = loaded;
  const byKey = new Map<string, Planned>();
  const refs = new Map<string, { ref: ArtifactRef; where: string }>();
  const planned: Planned[] = [];
  const note = (value: unknown, where: string) => {
    for (const { path, ref } of findArtifactRefs(value)) if (!refs.has(ref.sha256)) refs.set(ref.sha256, { ref, where: path ? `${where}, ${path}` : where });
  };
  for (const [i, c] of doc.checkpoints.entries()) {
    const at = `checkpoints[${i}] (${c.id})`;
    const decode = async (value: Parameters<typeof decodeValue>[1], what: string) => {
      try {
        return await decodeValue(saver.serde, value);
      } catch (error) {
        throw invalid(source, `${what} of ${at} cannot be decoded (${(error as Error).message})`);
      }
    };
    const parentPlanned = c.parent === null ? undefined : byKey.get(key(c.ns, c.parent));
    const values: Record<string, unknown> = {};
    if (parentPlanned) {
      // Unchanged channels keep the parent's value: a channel's value changes only with its version.
      const parentValues = parentPlanned.checkpoint.channel_values;
      const parentVersions = parentPlanned.checkpoint.channel_versions;
      for (const [channel, version] of Object.entries(c.checkpoint.channel_versions)) {
        if (parentVersions[channel] === version && channel in parentValues) values[channel] = parentValues[channel];
      }
    }
    for (const [channel, json] of Object.entries(c.values)) {
      values[channel] = await decode({ json }, `value "${channel}"`);
      note(values[channel], `${at}, ${channel}`);
    }
    for (const [channel, typed] of Object.entries(c.typedValues ?? {})) values[channel] = await decode(typed, `value "${channel}"`);
    const metadata = (await decode("metadataTyped" in c && c.metadataTyped ? c.metadataTyped : { json: c.metadata }, "the metadata")) as CheckpointMetadata;
    const writes = new Map<string, PendingWrite[]>();
    for (const [j, w] of c.writes.entries()) {
      const value = await decode("value" in w ? { json: w.value } : { type: w.type, base64: w.base64 }, `write ${j} (${w.channel})`);
      note(value, `${at}, write to ${w.channel}`);
      const list = writes.get(w.task) ?? [];
      list.push([w.channel, value]);
      writes.set(w.task, list);
    }
    const checkpoint = { ...structuredClone(c.checkpoint), channel_values: values } as Checkpoint;
    const p: Planned = { ns: c.ns, id: c.id, parent: c.parent, parentPlanned, checkpoint, metadata, writes, writeCount: c.writes.length };
    byKey.set(key(c.ns, c.id), p);
    planned.push(p);
  }
  return { planned, refs };
}

const key = (ns: string, id: string) => `${ns}\u0000${id}`;

/**
 * Every artifact the values refer to must be in the document, and every artifact's bytes must match
 * its hash; checked now, before anything is written. Bytes kept in files are read again when written.
 */
async function checkArtifacts(
  loaded: ThreadExport,
  refs: Map<string, { ref: ArtifactRef; where: string }>,
): Promise<{ entry: ExportedArtifact; bytes: () => Promise<Uint8Array> }[]> {
  const { document: doc, source, baseDir } = loaded;
  const entries = new Map(doc.artifacts.map((a) => [a.sha256, a]));
  for (const [sha, { ref, where }] of refs) {
    if (!entries.has(sha)) {
      throw invalid(source, `artifact sha256:${sha.slice(0, 12)}…${ref.name ? ` (${ref.name})` : ""}, referenced by ${where}, is not in the export`);
    }
  }
  const out: { entry: ExportedArtifact; bytes: () => Promise<Uint8Array> }[] = [];
  for (const entry of entries.values()) {
    const label = `artifact sha256:${entry.sha256.slice(0, 12)}…${entry.name ? ` (${entry.name})` : ""}`;
    let read: () => Promise<Uint8Array>;
    if (entry.base64 !== undefined) {
      const data = new Uint8Array(Buffer.from(entry.base64, "base64"));
      read = async () => data;
    } else {
      if (baseDir === undefined) {
        throw invalid(source, `${label} is kept in a file (${entry.file}) beside the document; import the export directory (or its thread.json) instead`);
      }
      const file = join(baseDir, entry.file!);
      read = async () => {
        try {
          return new Uint8Array(await readFile(file));
        } catch (error) {
          throw invalid(source, `${label} should be in ${file}, which cannot be read (${(error as NodeJS.ErrnoException).code ?? (error as Error).message})`);
        }
      };
    }
    const data = await read();
    const sha = createHash("sha256").update(data).digest("hex");
    if (sha !== entry.sha256 || data.byteLength !== entry.size) {
      throw invalid(source, `${label} is damaged: its ${data.byteLength} bytes hash to sha256:${sha.slice(0, 12)}…, not the ${entry.size} bytes recorded`);
    }
    out.push({ entry, bytes: read });
  }
  return out;
}

// -------------------------------------------------------------------------------------------------
// Channel versions

type Version = ChannelVersions[string];

/**
 * The checkpoints with channel versions minted by the target saver. Stores mint versions their own way
 * (file-store strings, Postgres 32-digit strings, SQLite integers), and LangGraph compares and extends
 * them within a branch, so one store's versions cannot be trusted in another.
 *
 * Versions are mapped branch by branch: two branches of a SQLite thread reuse the same integers for
 * different values, which must become different versions in a store that keys values by version. A
 * checkpoint's versions are its parent's (mapped as the parent's were) or were minted after all of the
 * parent's; the new ones get fresh versions after the parent's highest, in their original order. So
 * within each branch the order LangGraph relies on is kept, and `newVersions` names exactly the channels
 * whose version differs from the parent's (every channel for a root): what Postgres and the file store
 * write values for.
 */
function remintVersions(saver: BaseCheckpointSaver, planned: Planned[]): (Planned & { newVersions: ChannelVersions })[] {
  const maps = new Map<Planned, Map<string, Version>>();
  const next = (current: Version | undefined) => saver.getNextVersion(current as number | undefined) as Version;
  return planned.map((c) => {
    const parentMap = c.parentPlanned ? maps.get(c.parentPlanned) : undefined;
    const map = new Map<string, Version>();
    const fresh: Version[] = [];
    const originals = [...Object.values(c.checkpoint.channel_versions), ...Object.values(c.checkpoint.versions_seen).flatMap((seen) => Object.values(seen))];
    for (const v of originals) {
      const k = versionKey(v);
      if (map.has(k)) continue;
      const mapped = parentMap?.get(k);
      if (mapped !== undefined) map.set(k, mapped);
      else {
        map.set(k, v);
        fresh.push(v);
      }
    }
    fresh.sort(compareOriginal);
    let last = parentMap && parentMap.size > 0 ? maxVersion([...parentMap.values()]) : undefined;
    for (const v of fresh) {
      last = next(last);
      map.set(versionKey(v), last);
    }
    maps.set(c, map);

    const remap = (versions: ChannelVersions): ChannelVersions =>
      Object.fromEntries(Object.entries(versions).map(([channel, v]) => [channel, map.get(versionKey(v))!]));
    const channel_versions = remap(c.checkpoint.channel_versions);
    const versions_seen = Object.fromEntries(Object.entries(c.checkpoint.versions_seen).map(([node, seen]) => [node, remap(seen)]));
    const parentVersions = c.parentPlanned?.checkpoint.channel_versions;
    const newVersions: ChannelVersions = {};
    for (const [channel, v] of Object.entries(c.checkpoint.channel_versions)) {
      if (parentVersions === undefined || parentVersions[channel] !== v) newVersions[channel] = channel_versions[channel]!;
    }
    return { ...c, checkpoint: { ...c.checkpoint, channel_versions, versions_seen }, newVersions };
  });
}

const versionKey = (v: Version) => `${typeof v}:${String(v)}`;

/** The integer part of a version: `3`, `"0000000003.48213377"`; NaN when there is none. */
function counterOf(v: Version): number {
  return typeof v === "number" ? v : Number.parseInt(String(v).split(".")[0] ?? "", 10);
}

/** Original versions in the order they were minted: by their counter, then as text. */
function compareOriginal(a: Version, b: Version): number {
  const ca = counterOf(a);
  const cb = counterOf(b);
  if (!Number.isNaN(ca) && !Number.isNaN(cb) && ca !== cb) return ca - cb;
  const sa = String(a);
  const sb = String(b);
  return sa < sb ? -1 : sa > sb ? 1 : 0;
}

/** The highest of versions the target minted (its own kind, so its own order). */
function maxVersion(versions: Version[]): Version {
  return versions.reduce((max, v) => (compareMinted(v, max) > 0 ? v : max));
}

function compareMinted(a: Version, b: Version): number {
  if (typeof a === "number" && typeof b === "number") return a - b;
  return compareOriginal(a, b);
}
