import { hostname } from "node:os";
import { dirname, join, resolve } from "node:path";
import type { RunnableConfig } from "@langchain/core/runnables";
import {
  BaseCheckpointSaver,
  TASKS,
  WRITES_IDX_MAP,
  maxChannelVersion,
  compareWritesSortKeys,
  getCheckpointId,
  writesSortKey,
  type ChannelVersions,
  type Checkpoint,
  type CheckpointListOptions,
  type CheckpointMetadata,
  type CheckpointPendingWrite,
  type CheckpointTuple,
  type PendingWrite,
  type SerializerProtocol,
} from "@langchain/langgraph-checkpoint";
import { MAP_PREFIX } from "../channels.ts";
import { CairnError } from "../errors.ts";
import { JournalWriter, createJournal, decodeLine, encodeLine, readRecord, scanLines, withGen, type RecordLocation } from "./journal.ts";
import { isStale, leaseMs, lostLock, type LockHolder as PublicHolder } from "./lease.ts";
import { ThreadGate } from "./gate.ts";
import { decodeThreadDir, encodeThreadDir, stepFileName } from "./names.ts";
import { isInternalChannel, nodesThatRan } from "./steps.ts";
import { uniqueVersion } from "./versions.ts";
import { CairnSerializer, isDefaultSerializer, needsRevive, plainJsonText } from "./serde.ts";
import { fsyncDir } from "./fsync.ts";
import { nodeFs, writeAll, type StoreFileHandle, type StoreFs } from "./fs.ts";
import { isStorageFailure, storageError } from "./io-errors.ts";

/** The version of the on-disk format this code writes. Readers refuse newer versions with a clear error. */
export const FILE_STORE_FORMAT_VERSION = 1;

const STORE_MARKER = "cairn-store.json";
const JOURNAL = "journal.log";
const LOCK = "writer.lock";
/** A compacted journal is written under this prefix, then renamed over the journal. */
const COMPACTING = `${JOURNAL}.compact-`;

/** Who holds a thread's writer lock. */
interface LockHolder {
  pid: number;
  host: string;
  since: string;
  /** The saver object holding it, so two savers in one process exclude each other too. */
  saver: string;
  /** The generation the holder writes with (absent on locks of older versions). */
  gen?: number;
  /** Its lease in ms: the lock expires this long after the file's mtime, which the holder keeps touching. */
  lease?: number;
  /** Derived on reading: mtime + lease. */
  expires?: string;
}

let saverCount = 0;

/** A serialized value as it sits in a record: inline JSON when the serializer produced JSON, else base64. */
type EncodedValue = { t: "json"; d: unknown } | { t: "undefined" } | { t: "empty" } | { t: string; b64: string };

interface HeaderRecord {
  k: "hdr";
  format: "cairn-journal";
  v: number;
  thread: string;
  created: string;
  /** Random: tells this journal from one made again after the thread was deleted (or compacted). */
  id?: string;
  /** Set on a journal written by compaction: when, and how many root checkpoints it left out. */
  compacted?: { at: string; removed: number };
}
interface CheckpointRecord {
  k: "cp";
  ns: string;
  id: string;
  parent: string | null;
  /** The checkpoint without `channel_values`; those live in `blobs`, once per (channel, version). */
  cp: Omit<Checkpoint, "channel_values">;
  md: EncodedValue;
  blobs: Record<string, { ver: string | number } & EncodedValue>;
  /**
   * The checkpoint's order in its thread (root namespace), when it is not simply one more than the
   * record before: compaction writes it on the records it keeps, so step files keep their numbers.
   */
  n?: number;
}
interface WritesRecord {
  k: "w";
  ns: string;
  cp: string;
  task: string;
  path: string;
  w: ({ i: number; ch: string } & EncodedValue)[];
}
/** Appended by a writer that closes cleanly: every record before it was acknowledged. */
interface EndRecord {
  k: "end";
  at: string;
}
/**
 * Appended by `setAsideDamage`: these damaged byte ranges were seen and accepted, and these root
 * checkpoints (damaged, or reading from damage) are never served again.
 */
interface AsideRecord {
  k: "aside";
  at: string;
  ranges: { offset: number; length: number; why: string }[];
  checkpoints: string[];
}
/**
 * Appended by a process that takes the thread's writer lock (and by `cairn unlock`, which breaks one).
 *
 * Generations: every record carries the generation `g` of the writer that appended it (absent: 0). A
 * `gen` record with a generation above the current one makes it current; from there on, records of any
 * other generation are ignored by every reader. A writer paused while its lock was taken over (a
 * "zombie") can only append after the new holder's `gen` record (appends use O_APPEND, never a position),
 * so whatever it writes then carries an older generation and is never read: the history cannot fork.
 * The new holder reads the journal after its `gen` record is on disk, so it sees every record that came
 * before. A lock file names its holder's generation, so a holder taking over a stale lock, or `cairn
 * unlock` breaking one, picks a higher generation than the one it displaces, even if that holder has not
 * appended its own `gen` record yet.
 */
interface GenRecord {
  k: "gen";
  g: number;
  pid?: number;
  host?: string;
  at: string;
  /** Set when `cairn unlock` wrote it: a fence with no writer behind it. */
  unlock?: boolean;
}
type JournalRecord = (HeaderRecord | CheckpointRecord | WritesRecord | EndRecord | AsideRecord | GenRecord) & { g?: number };

/** A damaged stretch of a journal, and what it can be told to have held. */
export interface JournalDamage {
  file: string;
  offset: number;
  length: number;
  /** What is wrong with the bytes. */
  why: string;
  /** What the record was, as far as its bytes still tell: a checkpoint, task results of one, the header. */
  held?: { kind: "checkpoint" | "writes" | "header" | "end"; ns?: string; checkpoint?: string };
  /** Set aside by an earlier `resume --fallback`: accepted, no longer refused. */
  setAside: boolean;
}

/** A checkpoint of a thread that cannot be served whole, and why. */
export interface DamagedCheckpoint {
  checkpoint: string;
  why: string;
}

/** What `verifyThread` found in one thread of the file store. */
export interface ThreadVerification {
  thread: string;
  file: string;
  /** Checkpoints in the journal (every namespace). */
  checkpoints: number;
  /** Checkpoints that read back whole (every value decodes). */
  intact: number;
  damage: JournalDamage[];
  /** Checkpoints that cannot be served whole: held by damage, or reading a value or task result from it. */
  affected: DamagedCheckpoint[];
}

interface CheckpointEntry extends RecordLocation {
  id: string;
  parent: string | null;
  /** Its order in the thread (root namespace only; 0 elsewhere): the number of its step file. */
  order: number;
}
interface WriteEntry {
  loc: RecordLocation;
  task: string;
  path: string;
  idx: number;
}

/** The in-memory index of one thread's journal: where each record is, never the values themselves. */
interface ThreadIndex {
  thread: string;
  dir: string;
  file: string;
  validEnd: number;
  checkpoints: Map<string, Map<string, CheckpointEntry>>;
  sorted: Map<string, string[] | undefined>;
  blobs: Map<string, RecordLocation>;
  writes: Map<string, WriteEntry[]>;
  rootCount: number;
  writer?: JournalWriter;
  opening?: Promise<void>;
  /** A writer being replaced after a failed write (see writableIndex). */
  reviving?: Promise<void>;
  refreshing?: Promise<void>;
  /** A scan queued behind the running one, not started yet: later callers wait for it too. */
  queuedScan?: Promise<void>;
  reader?: StoreFileHandle;
  /** The journal this index describes: its header's id (a deleted and recreated thread is a new one). */
  journalId?: string;
  /** Whether this saver holds the thread's writer lock. */
  locked?: boolean;
  /** The kind of the last intact record scanned ("end" after a clean close). */
  lastKind?: JournalRecord["k"];
  /** Where the journal's trailing `end` record starts, when the journal ends with one (closed cleanly). */
  endAt?: number;
  /**
   * Small write records already read, by offset. The journal is append-only, so a record never changes
   * at its offset; a resumed fan-out reads its thousands of saved items several times (getTuple for the
   * run, for the state, for the spend), and each would otherwise be a read of its own.
   */
  writeCache?: Map<number, JournalRecord>;
  writeCacheBytes?: number;
  /** Damaged lines found, by offset (set-aside ones included). */
  damage: Map<number, JournalDamage>;
  /** Offsets of damage set aside by an `aside` record. */
  aside: Set<number>;
  /** The current generation: records of any other are ignored (see GenRecord). */
  gen: number;
  /** The highest generation any record or lock of this journal named. */
  maxGen: number;
  /** Records ignored because a newer generation had taken the thread before they landed. */
  fenced: number;
  /** This saver's generation while it holds the lock. */
  myGen?: number;
  /** Keeps the lock's lease alive while held. */
  heartbeat?: ReturnType<typeof setInterval>;
}

/** Bytes of write records a thread's index keeps read (a bound, not a target). */
const WRITE_CACHE_BYTES = 32 * 1024 * 1024;

/** What `deleteCheckpoints` removed (or, with `dryRun`, would remove). */
export interface DeletedCheckpoints {
  /** Ids of the checkpoints removed. */
  deleted: string[];
  /** Bytes freed on disk (the file store), or the stored bytes of the deleted rows (SQLite, Postgres). */
  bytesFreed: number;
}

export interface FileCheckpointSaverOptions {
  /** The store directory (created on first write). cairn's default is `.cairn` in the working directory. */
  dir: string;
  /**
   * Write the human-readable per-step files (`0003-story_generator.json`) beside each thread's journal.
   * They are a view derived from the journal, written without fsync; the journal is the record.
   * @default true
   */
  stepFiles?: boolean;
  serde?: SerializerProtocol;
}

const blobKey = (ns: string, channel: string, version: string | number) => `${ns}\u0000${channel}\u0000${String(version)}`;
const cpKey = (ns: string, id: string) => `${ns}\u0000${id}`;

/**
 * cairn's embedded checkpoint store: a directory with one folder per thread, each holding an append-only
 * journal of checksummed records and a readable JSON file per step.
 *
 * - Durable: `put` and `putWrites` return only after their record is fdatasync'ed; a crash at any instant
 *   leaves the old or the new checkpoint, never a torn one.
 * - Compact: a channel's value is written once per version, so channels a step did not change are not
 *   written again.
 * - Verified: every record carries a CRC-32 that is checked on every read.
 *
 * @example
 * ```ts
 * import { FileCheckpointSaver } from "cairn";
 * const saver = new FileCheckpointSaver({ dir: ".cairn" });
 * const app = graph.compile({ checkpointer: saver });
 * ```
 */
export class FileCheckpointSaver extends BaseCheckpointSaver {
  readonly dir: string;
  private readonly threadsDir: string;
  private readonly stepFiles: boolean;
  private readonly indexes = new Map<string, Promise<ThreadIndex | undefined>>();
  /** Per thread: reads and writes share it, compaction and deletion have it alone (see ThreadGate). */
  private readonly gates = new Map<string, ThreadGate>();
  /**
   * The `versions_seen` of the last checkpoint put per thread: when metadata names no step (a plain
   * LangGraph app using this saver directly), the nodes whose entry changed since then name the step file.
   */
  private lastSeen = new Map<string, Checkpoint["versions_seen"]>();
  private markerChecked?: Promise<void>;
  private markerWritten?: Promise<void>;
  /** Thread creations under way, so concurrent first writes to a thread create it once. */
  private creating = new Map<string, Promise<void>>();
  private readonly saverId: string;
  private tmpCount = 0;
  /** The serializer is LangGraph's JSON one (or cairn's faster equal): plain JSON is written and read directly. */
  private readonly plainJson: boolean;
  /** Every file operation goes through here (see fs.ts). */
  private readonly fs: StoreFs;
  /** The pid this saver writes into its lock and temporary names. */
  private readonly pid: number;

  /**
   * @param internal For cairn's own crash tests only: the file operations to use (default: node's), and
   *   the pid to record as the writer (a simulated crashed process must look dead to the next one).
   */
  constructor(options: FileCheckpointSaverOptions, internal: { fs?: StoreFs; pid?: number } = {}) {
    super(options.serde ?? new CairnSerializer());
    this.plainJson = isDefaultSerializer(this.serde);
    this.fs = internal.fs ?? nodeFs;
    this.pid = internal.pid ?? process.pid;
    this.saverId = `${this.pid}-${(saverCount += 1)}-${Date.now().toString(36)}`;
    this.dir = options.dir;
    this.threadsDir = join(options.dir, "threads");
    this.stepFiles = options.stepFiles ?? true;
  }

  /**
   * Channel versions unique to each write (`0000000003.48213377`): values are stored once per
   * (channel, version), so versions must never repeat across branches of a thread (a from-step fork
   * mints versions again from an older checkpoint), or one branch would overwrite another's values.
   */
  override getNextVersion(current: number | undefined): number {
    return uniqueVersion(current, 10, 8) as unknown as number;
  }

  // ---------------------------------------------------------------------------------------------
  // Reading

  async getTuple(config: RunnableConfig): Promise<CheckpointTuple | undefined> {
    const thread = config.configurable?.thread_id as string | undefined;
    if (thread === undefined) return undefined;
    const ns = (config.configurable?.checkpoint_ns as string | undefined) ?? "";
    return this.gate(thread).shared(async () => {
      const index = await this.index(thread);
      if (!index) return undefined;
      const byId = index.checkpoints.get(ns);
      if (!byId) return undefined;
      const id = getCheckpointId(config) || this.sortedIds(index, ns)[0];
      const entry = id ? byId.get(id) : undefined;
      if (!entry) return undefined;
      return this.loadTuple(index, ns, entry);
    });
  }

  async *list(config: RunnableConfig, options: CheckpointListOptions = {}): AsyncGenerator<CheckpointTuple> {
    yield* this.listTuples(config, options, true);
  }

  /**
   * `list` without the state: each tuple has its checkpoint's metadata, ids, versions and parent, but
   * empty `channel_values` and no pending writes. For reading what checkpoints recorded (their step,
   * spend, time) without loading a big state once per checkpoint: a record holding a value another
   * checkpoint also shows is not read again for it.
   */
  async *listMetadata(config: RunnableConfig, options: CheckpointListOptions = {}): AsyncGenerator<CheckpointTuple> {
    yield* this.listTuples(config, options, false);
  }

  private async *listTuples(config: RunnableConfig, options: CheckpointListOptions, values: boolean): AsyncGenerator<CheckpointTuple> {
    const { before, filter } = options;
    let limit = options.limit;
    const wantThread = config.configurable?.thread_id as string | undefined;
    const wantNs = config.configurable?.checkpoint_ns as string | undefined;
    const wantId = config.configurable?.checkpoint_id as string | undefined;
    const beforeId = before?.configurable?.checkpoint_id as string | undefined;
    const threads = wantThread !== undefined ? [wantThread] : await this.listThreadIds();
    for (const thread of threads) {
      const gate = this.gate(thread);
      const index = await gate.shared(() => this.index(thread));
      if (!index) continue;
      for (const ns of [...index.checkpoints.keys()].sort()) {
        if (wantNs !== undefined && ns !== wantNs) continue;
        for (const id of this.sortedIds(index, ns)) {
          if (wantId && id !== wantId) continue;
          if (beforeId && id >= beforeId) continue;
          // Between two yields the thread may have been compacted: a checkpoint removed meanwhile is skipped.
          const tuple = await gate.shared(async () => {
            const entry = index.checkpoints.get(ns)?.get(id);
            return entry ? this.loadTuple(index, ns, entry, values) : undefined;
          });
          if (!tuple) continue;
          if (filter && !matchesFilter(tuple.metadata, filter)) continue;
          if (limit !== undefined) {
            if (limit <= 0) return;
            limit -= 1;
          }
          yield tuple;
        }
      }
    }
  }

  /** Ids of every thread in the store, sorted. */
  async listThreadIds(): Promise<string[]> {
    let names: string[];
    try {
      names = await this.fs.readdir(this.threadsDir);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return [];
      throw error;
    }
    return names
      .filter((n) => !n.startsWith("."))
      .map(decodeThreadDir)
      .filter((n): n is string => n !== undefined)
      .sort();
  }

  /** The folder that holds a thread's journal and readable step files. */
  threadDir(thread: string): string {
    const name = encodeThreadDir(thread);
    if (Buffer.byteLength(name) > 240) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Thread id ${JSON.stringify(thread.slice(0, 40))}… is too long for the file store (its folder name would be ${Buffer.byteLength(name)} bytes; the limit is 240). Use a shorter id.`,
        { thread },
      );
    }
    return join(this.threadsDir, name);
  }

  /** `values: false`: the checkpoint without its channel values and pending writes (see listMetadata). */
  private async loadTuple(index: ThreadIndex, ns: string, entry: CheckpointEntry, values = true): Promise<CheckpointTuple> {
    const rec = await this.read<CheckpointRecord>(index, entry, "cp", entry.id);
    const channel_values: Record<string, unknown> = {};
    // Several unchanged channels often live in one earlier record: read it once (each value is its own part of it).
    const holders = new Map<number, CheckpointRecord>([[entry.offset, rec]]);
    for (const [channel, version] of values ? Object.entries(rec.cp.channel_versions) : []) {
      const loc = index.blobs.get(blobKey(ns, channel, version));
      if (!loc) continue;
      let holder = holders.get(loc.offset);
      if (!holder) {
        holder = await this.read<CheckpointRecord>(index, loc, "cp");
        holders.set(loc.offset, holder);
      }
      const blob = holder.blobs[channel];
      if (!blob || blob.t === "empty") continue;
      channel_values[channel] = await this.decode(blob);
    }
    const checkpoint = { ...rec.cp, channel_values } as Checkpoint;
    if (values && checkpoint.v < 4 && entry.parent) await this.migratePendingSends(index, ns, entry.parent, checkpoint);
    const config = { configurable: { thread_id: index.thread, checkpoint_ns: ns, checkpoint_id: entry.id } };
    const tuple: CheckpointTuple = {
      config,
      checkpoint,
      metadata: (await this.decode(rec.md)) as CheckpointMetadata,
      pendingWrites: values ? await this.loadWrites(index, ns, entry.id) : [],
    };
    if (entry.parent) {
      tuple.parentConfig = { configurable: { thread_id: index.thread, checkpoint_ns: ns, checkpoint_id: entry.parent } };
    }
    return tuple;
  }

  /** Checkpoints older than format 4 kept pending sends as writes on their parent; fold them in. */
  private async migratePendingSends(index: ThreadIndex, ns: string, parent: string, checkpoint: Checkpoint): Promise<void> {
    const sends = (await this.loadWrites(index, ns, parent)).filter(([, channel]) => channel === TASKS).map(([, , value]) => value);
    checkpoint.channel_values[TASKS] = sends;
    const versions = Object.values(checkpoint.channel_versions);
    checkpoint.channel_versions[TASKS] = versions.length > 0 ? maxChannelVersion(...versions) : this.getNextVersion(undefined);
  }

  private async loadWrites(index: ThreadIndex, ns: string, id: string): Promise<CheckpointPendingWrite[]> {
    const entries = index.writes.get(cpKey(ns, id));
    if (!entries || entries.length === 0) return [];
    // Regular writes (idx >= 0) keep their first value; special writes (errors, interrupts) keep their last.
    const chosen = new Map<string, { task: string; path: string; idx: number; ch: string; value: EncodedValue; shared: boolean }>();
    const records = new Map<number, WritesRecord>();
    for (const e of entries) {
      let rec = records.get(e.loc.offset);
      if (!rec) {
        rec = await this.read<WritesRecord>(index, e.loc, "w");
        records.set(e.loc.offset, rec);
      }
      const w = rec.w.find((x) => x.i === e.idx);
      if (!w) continue;
      const key = `${e.task},${e.idx}`;
      if (e.idx >= 0 && chosen.has(key)) continue;
      chosen.set(key, { task: e.task, path: e.path, idx: e.idx, ch: w.ch, value: w, shared: index.writeCache?.get(e.loc.offset) === rec });
    }
    const ordered = [...chosen.values()].sort((a, b) =>
      compareWritesSortKeys(writesSortKey(a.path, a.task, a.idx), writesSortKey(b.path, b.task, b.idx)),
    );
    return Promise.all(ordered.map(async (w) => [w.task, w.ch, await this.decode(w.value, w.shared)] as CheckpointPendingWrite));
  }

  private sortedIds(index: ThreadIndex, ns: string): string[] {
    let ids = index.sorted.get(ns);
    if (!ids) {
      ids = [...(index.checkpoints.get(ns)?.keys() ?? [])].sort().reverse();
      index.sorted.set(ns, ids);
    }
    return ids;
  }

  private async read<T extends JournalRecord>(index: ThreadIndex, loc: RecordLocation, kind: T["k"], id?: string): Promise<T> {
    const cached = kind === "w" ? index.writeCache?.get(loc.offset) : undefined;
    if (cached) return cached as T;
    index.reader ??= await this.fs.open(index.file, "r");
    const record = await readRecord<JournalRecord>(index.reader, index.file, loc);
    // The index and the file must agree on what sits at this offset; anything else is never served.
    if (record.k !== kind || (id !== undefined && (record as CheckpointRecord).id !== id)) {
      throw new CairnError(
        "CHECKPOINT_CORRUPT",
        `Checkpoint journal ${index.file} changed under this process: byte ${loc.offset} no longer holds the expected record. ` +
          `Was the thread written by two processes at once? Nothing was loaded; run the command again.`,
        { file: index.file, offset: loc.offset },
      );
    }
    if (kind === "w" && (index.writeCacheBytes ?? 0) + loc.length <= WRITE_CACHE_BYTES) {
      (index.writeCache ??= new Map()).set(loc.offset, record);
      index.writeCacheBytes = (index.writeCacheBytes ?? 0) + loc.length;
    }
    return record as T;
  }

  // ---------------------------------------------------------------------------------------------
  // Writing

  async put(
    config: RunnableConfig,
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    newVersions: ChannelVersions,
  ): Promise<RunnableConfig> {
    const thread = requireThread(config, "put a checkpoint");
    return this.gate(thread)
      .shared(() => this.putCheckpoint(thread, config, checkpoint, metadata, newVersions))
      .catch((error: unknown) => {
        throw this.storageFailure(error, thread, `saving checkpoint ${checkpoint.id} of thread "${thread}"`);
      });
  }

  private async putCheckpoint(
    thread: string,
    config: RunnableConfig,
    checkpoint: Checkpoint,
    metadata: CheckpointMetadata,
    newVersions: ChannelVersions,
  ): Promise<RunnableConfig> {
    const ns = (config.configurable?.checkpoint_ns as string | undefined) ?? "";
    const parent = (config.configurable?.checkpoint_id as string | undefined) ?? null;
    const index = await this.writableIndex(thread);

    const { channel_values, ...rest } = checkpoint;
    const blobParts: string[] = [];
    for (const [channel, version] of Object.entries(newVersions)) {
      const value = channel in channel_values ? await this.encode(channel_values[channel]) : `{"t":"empty"}`;
      blobParts.push(`${JSON.stringify(channel)}:${injectVersion(value, version)}`);
    }
    const json =
      `{"k":"cp","ns":${JSON.stringify(ns)},"id":${JSON.stringify(checkpoint.id)},"parent":${JSON.stringify(parent)},` +
      `"cp":${JSON.stringify(rest)},"md":${await this.encode(metadata)},"blobs":{${blobParts.join(",")}}}`;
    const loc = await index.writer!.append(json);

    this.indexCheckpoint(index, ns, checkpoint.id, parent, loc, Object.entries(newVersions));
    if (this.stepFiles && ns === "") await this.writeStepFile(index, checkpoint, metadata, parent);
    return { configurable: { thread_id: thread, checkpoint_ns: ns, checkpoint_id: checkpoint.id } };
  }

  async putWrites(config: RunnableConfig, writes: PendingWrite[], taskId: string, taskPath = ""): Promise<void> {
    const thread = requireThread(config, "save task writes");
    return this.gate(thread)
      .shared(() => this.putTaskWrites(thread, config, writes, taskId, taskPath))
      .catch((error: unknown) => {
        throw this.storageFailure(error, thread, `saving the results of task ${taskId} of thread "${thread}"`);
      });
  }

  private async putTaskWrites(thread: string, config: RunnableConfig, writes: PendingWrite[], taskId: string, taskPath: string): Promise<void> {
    const ns = (config.configurable?.checkpoint_ns as string | undefined) ?? "";
    const cp = config.configurable?.checkpoint_id as string | undefined;
    if (cp === undefined) {
      throw new CairnError("INVALID_ARGUMENT", `Cannot save task writes for thread "${thread}": the config names no checkpoint_id.`, {
        thread,
      });
    }
    const index = await this.writableIndex(thread);
    const existing = index.writes.get(cpKey(ns, cp)) ?? [];
    const parts: string[] = [];
    const idxs: number[] = [];
    for (const [i, [channel, value]] of writes.entries()) {
      const idx = WRITES_IDX_MAP[channel] ?? i;
      // A regular write already saved for this task is kept as it was (LangGraph replays them on resume).
      if (idx >= 0 && existing.some((e) => e.task === taskId && e.idx === idx)) continue;
      const encoded = await this.encode(value);
      parts.push(`{"i":${idx},"ch":${JSON.stringify(channel)},${encoded.slice(1)}`);
      idxs.push(idx);
    }
    if (parts.length === 0) return;
    const json =
      `{"k":"w","ns":${JSON.stringify(ns)},"cp":${JSON.stringify(cp)},"task":${JSON.stringify(taskId)},` +
      `"path":${JSON.stringify(taskPath)},"w":[${parts.join(",")}]}`;
    const loc = await index.writer!.append(json);
    const list = index.writes.get(cpKey(ns, cp)) ?? [];
    for (const idx of idxs) list.push({ loc, task: taskId, path: taskPath, idx });
    index.writes.set(cpKey(ns, cp), list);
  }

  async deleteThread(threadId: string): Promise<void> {
    return this.gate(threadId).exclusive(() => this.removeThread(threadId));
  }

  private async removeThread(threadId: string): Promise<void> {
    const index = await this.index(threadId);
    // Deleting is writing: never pull a thread from under the process that is writing it.
    if (index && !index.locked) await this.acquireLock(index);
    this.indexes.delete(threadId);
    this.lastSeen.delete(threadId);
    if (index) {
      await index.writer?.close();
      index.writer = undefined;
      await index.reader?.close();
      index.reader = undefined;
      // A listing still holding this index finds nothing more in it.
      index.checkpoints = new Map();
      index.sorted = new Map();
    }
    const dir = this.threadDir(threadId);
    const trash = join(this.threadsDir, `.deleted-${this.saverId}-${(this.tmpCount += 1)}`);
    try {
      // Rename first: the thread disappears in one step, and a crash mid-delete leaves only a dot-folder.
      await this.fs.rename(dir, trash);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return;
      throw error;
    }
    await fsyncDir(this.threadsDir, this.fs);
    await this.fs.rmTree(trash);
  }

  /**
   * Give up the thread's writer lock, if this saver holds it, and close its journal (marking the clean
   * close), as {@link close} does for every thread; the saver stays usable and its next write to the
   * thread takes the lock again.
   */
  async releaseThread(threadId: string): Promise<void> {
    const pending = this.indexes.get(threadId);
    if (!pending) return;
    const index = await pending.catch(() => undefined);
    if (index?.writer?.broken && !index.writer.reopenable) {
      // A failed fdatasync: this process never writes the thread again (see JournalWriter.reopenable), so
      // the broken writer stays in place to refuse every later write; only the lock is given up.
      await this.gate(threadId).exclusive(async () => {
        if (index.locked) await this.releaseLock(index);
      });
      return;
    }
    if (this.indexes.get(threadId) === pending) this.indexes.delete(threadId);
    if (index) await this.closeIndex(index);
  }

  /** Close the files this saver holds open. The saver reopens them if used again. */
  async close(): Promise<void> {
    const all = [...this.indexes.values()];
    this.indexes.clear();
    for (const p of all) {
      const index = await p.catch(() => undefined);
      if (index) await this.closeIndex(index);
    }
  }

  private async closeIndex(index: ThreadIndex): Promise<void> {
    // A compaction under way finishes first (it may be reopening the writer).
    await this.gate(index.thread).exclusive(async () => {
      await index.opening?.catch(() => {});
      if (index.writer) {
        // Mark the clean close; a failed write here only loses the mark, never a checkpoint.
        await index.writer.append(JSON.stringify({ k: "end", at: new Date().toISOString() } satisfies EndRecord)).catch(() => {});
        await index.writer.close();
        index.writer = undefined;
      }
      if (index.locked) await this.releaseLock(index);
      await index.reader?.close();
      index.reader = undefined;
    });
  }

  /** A full or failing disk met outside the journal append (creating the thread, its lock, the marker), as DISK_FULL / STORE_IO_FAILED. */
  private storageFailure(error: unknown, thread: string, what: string): unknown {
    if (!isStorageFailure(error)) return error;
    const file = (error as NodeJS.ErrnoException).path ?? this.threadDir(thread);
    return storageError(error, { file, thread, what });
  }

  private gate(thread: string): ThreadGate {
    let gate = this.gates.get(thread);
    if (!gate) {
      gate = new ThreadGate();
      this.gates.set(thread, gate);
    }
    return gate;
  }

  // ---------------------------------------------------------------------------------------------
  // The index

  /** The thread's index, refreshed if another process appended since it was built. */
  private async index(thread: string, tolerate = false): Promise<ThreadIndex | undefined> {
    // A thread being created by this saver is read once its creation (and its one index) is in place.
    await this.creating.get(thread)?.catch(() => {});
    let pending = this.indexes.get(thread);
    if (!pending) {
      pending = this.loadIndex(thread);
      this.indexes.set(thread, pending);
    }
    let index: ThreadIndex | undefined;
    try {
      index = await pending;
    } catch (error) {
      if (this.indexes.get(thread) === pending) this.indexes.delete(thread);
      throw error;
    }
    // "No such thread" is never remembered: another process may create the thread at any time.
    if (!index) {
      if (this.indexes.get(thread) === pending) this.indexes.delete(thread);
      return undefined;
    }
    if (!index.writer) {
      try {
        await this.refresh(index);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
        // Deleted since this index was built.
        await index.reader?.close();
        if (this.indexes.get(thread) === pending) this.indexes.delete(thread);
        return undefined;
      }
    }
    if (!tolerate) refuseDamage(index);
    return index;
  }

  private async loadIndex(thread: string): Promise<ThreadIndex | undefined> {
    const dir = this.threadDir(thread);
    const file = join(dir, JOURNAL);
    try {
      await this.fs.stat(file);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw error;
    }
    await this.checkMarker();
    const index: ThreadIndex = {
      thread,
      dir,
      file,
      validEnd: 0,
      checkpoints: new Map(),
      sorted: new Map(),
      blobs: new Map(),
      writes: new Map(),
      rootCount: 0,
      damage: new Map(),
      aside: new Set(),
      gen: 0,
      maxGen: 0,
      fenced: 0,
    };
    await this.refresh(index);
    if (index.validEnd === 0) {
      // No complete record yet: the thread is being created (or its creation was cut short), unless step
      // files beside it show it had checkpoints: then its journal was emptied or cut, and that is damage.
      const steps = (await this.fs.readdir(dir).catch(() => [] as string[])).filter((n) => /^\d+-.*\.json$/.test(n));
      if (steps.length > 0) {
        const { size } = await this.fs.stat(file);
        throw new CairnError(
          "CHECKPOINT_CORRUPT",
          `Checkpoint journal ${file} of thread "${thread}" holds no intact record (${size} bytes), yet ${steps.length} step files beside it show the thread had checkpoints. ` +
            `Nothing was loaded. Restore the journal from a backup; \`cairn verify ${thread}\` reports the store's other damage.`,
          { file, offset: 0, thread },
        );
      }
      return undefined;
    }
    return index;
  }

  /**
   * Read whatever the journal holds past what the index covers: one scan at a time per thread, and
   * callers that ask while a scan waits to start share it (it will see everything they could), so a
   * burst of reads (a resumed fan-out's items finishing together) costs two scans, not one each.
   */
  private refresh(index: ThreadIndex): Promise<void> {
    if (index.queuedScan) return index.queuedScan;
    const next = (index.refreshing ?? Promise.resolve()).then(() => {
      index.queuedScan = undefined;
      return this.scanTail(index);
    });
    index.queuedScan = next;
    index.refreshing = next.catch(() => {});
    return next;
  }

  private async scanTail(index: ThreadIndex): Promise<void> {
    const handle = await this.fs.open(index.file, "r");
    let bytes: Buffer;
    try {
      const { size } = await handle.stat();
      const journalId = await headerId(handle, size);
      if ((index.journalId !== undefined && journalId !== index.journalId) || size < index.validEnd) {
        // The thread was deleted and made again (or the file replaced): what this index knew is void.
        await index.reader?.close();
        index.reader = undefined;
        Object.assign(index, emptyIndexState());
      }
      index.journalId = journalId;
      if (size <= index.validEnd) return;
      bytes = Buffer.alloc(size - index.validEnd);
      await handle.read(bytes, 0, bytes.length, index.validEnd);
    } finally {
      await handle.close();
    }
    const { records, validEnd, torn, damage } = scanLines<JournalRecord>(bytes, index.validEnd, (r) => isObject(r) && r.k === "gen");
    for (const d of damage) this.noteDamage(index, d, d.why, identify(d.text));
    const last = records.length ? records[records.length - 1]!.record.k : index.lastKind;
    // Bad bytes after the last good record are an unfinished write, unless that record is the "end" a
    // writer appends when it closes cleanly: nothing was being written then, so the bytes are damage.
    if (torn && last === "end") {
      const length = index.validEnd + bytes.length - validEnd;
      const text = bytes.toString("utf8", validEnd - index.validEnd, Math.min(bytes.length, validEnd - index.validEnd + 4096));
      this.noteDamage(index, { offset: validEnd, length }, "the journal was closed cleanly, yet the bytes after its end record do not form intact records", identify(text));
    }
    index.lastKind = last;
    if (records.length > 0) {
      const tail = records[records.length - 1]!;
      index.endAt = tail.record.k === "end" && !torn ? tail.offset : undefined;
    } else if (torn) index.endAt = undefined;
    for (const { record, offset, length } of records) {
      const loc = { offset, length };
      const wrong = structureProblem(record);
      if (wrong) {
        this.noteDamage(index, loc, `its checksum matches but ${wrong}`, identify(JSON.stringify(record)));
        continue;
      }
      const g = typeof record.g === "number" ? record.g : 0;
      if (record.k === "gen") {
        index.maxGen = Math.max(index.maxGen, g);
        if (g > index.gen) index.gen = g;
        else index.fenced += 1; // a takeover that came too late: its writer lost the race
        continue;
      }
      if (record.k === "hdr") {
        index.gen = g;
        index.maxGen = Math.max(index.maxGen, g);
      } else if (g !== index.gen) {
        index.fenced += 1; // written by a holder that had lost the lock: never part of the history
        continue;
      }
      if (record.k === "aside") {
        for (const r of record.ranges) index.aside.add(r.offset);
        for (const d of index.damage.values()) d.setAside = index.aside.has(d.offset);
        const roots = index.checkpoints.get("");
        for (const id of record.checkpoints) {
          roots?.delete(id);
          index.writes.delete(cpKey("", id));
        }
        index.sorted.set("", undefined);
      } else if (record.k === "hdr") {
        if (record.v > FILE_STORE_FORMAT_VERSION) throw newerFormat(index.file, record.v);
      } else if (record.k === "cp") {
        this.indexCheckpoint(
          index,
          record.ns,
          record.id,
          record.parent,
          loc,
          Object.entries(record.blobs).map(([ch, b]) => [ch, b.ver]),
          record.n,
        );
      } else if (record.k === "w") {
        const key = cpKey(record.ns, record.cp);
        const list = index.writes.get(key) ?? [];
        for (const w of record.w) list.push({ loc, task: record.task, path: record.path, idx: w.i });
        index.writes.set(key, list);
      }
    }
    index.validEnd = validEnd;
  }

  private indexCheckpoint(
    index: ThreadIndex,
    ns: string,
    id: string,
    parent: string | null,
    loc: RecordLocation,
    versions: [string, string | number][],
    order?: number,
  ): void {
    let byId = index.checkpoints.get(ns);
    if (!byId) {
      byId = new Map();
      index.checkpoints.set(ns, byId);
    }
    const known = byId.get(id);
    if (!known && ns === "") index.rootCount = order ?? index.rootCount + 1;
    byId.set(id, { id, parent, ...loc, order: known?.order ?? (ns === "" ? index.rootCount : 0) });
    index.sorted.set(ns, undefined);
    for (const [channel, version] of versions) index.blobs.set(blobKey(ns, channel, version), loc);
  }

  /** The thread's index with its journal open for appending, creating the thread on first write. */
  private async writableIndex(thread: string, tolerate = false): Promise<ThreadIndex> {
    let index = await this.index(thread, tolerate);
    if (!index) {
      let creation = this.creating.get(thread);
      if (!creation) {
        creation = (async () => {
          await this.createThread(thread);
          // Replace the "no such thread" answer cached before the thread existed, once, for every caller.
          const loading = this.loadIndex(thread);
          this.indexes.set(thread, loading);
          await loading;
        })().finally(() => this.creating.delete(thread));
        this.creating.set(thread, creation);
      }
      await creation;
      index = await this.index(thread, tolerate);
      if (!index) throw new Error(`BUG: thread ${thread} was created but cannot be read back`);
    }
    if (index.writer?.reopenable) {
      // The last append failed to write (a full disk): bytes of it may sit past the last record. A new
      // writer scans the journal again and cuts them; after a failed fdatasync it never does (see JournalWriter).
      index.reviving ??= this.reopen(index).finally(() => {
        index.reviving = undefined;
      });
      await index.reviving;
    }
    if (!index.writer) {
      const opened = index;
      opened.opening ??= (async () => {
        await this.ensureMarker();
        // A lock taken earlier (lockThread) must still be this saver's: one broken or taken over since
        // is lost, never silently replaced by a new one (a write started under it is refused).
        if (opened.locked) await this.checkStillWriter(opened);
        else await this.acquireLock(opened);
        try {
          // What an interrupted writer left (an unfinished compaction, lock or step file): never read, removed here.
          await removeLeftovers(this.fs, opened.dir, this.saverId);
          // Scan again under the lock: only bytes past the last good record (a torn tail) are cut.
          await this.refresh(opened);
          const gen = opened.myGen!;
          if (opened.maxGen >= gen) throw lostLock(opened.thread, join(opened.dir, LOCK), { file: opened.file });
          await this.openWriter(opened, gen);
          // The takeover: from this record on, only this generation's records count. Then read what
          // landed before it (a paused holder's last write), so this writer continues from all of it.
          await opened.writer!.append(JSON.stringify({ k: "gen", pid: this.pid, host: hostname(), at: new Date().toISOString() }));
          await this.scanTail(opened);
          if (opened.gen !== gen) throw lostLock(opened.thread, join(opened.dir, LOCK), { file: opened.file });
        } catch (error) {
          await opened.writer?.close().catch(() => {});
          opened.writer = undefined;
          await this.releaseLock(opened);
          throw error;
        }
      })();
      try {
        await opened.opening;
      } catch (error) {
        opened.opening = undefined;
        throw error;
      }
    }
    return index;
  }

  /**
   * Take the thread's writer lock: one writer per thread, across processes and saver objects. The lock
   * file is made complete under a temporary name and linked into place, which fails if a lock exists. A
   * lock whose process is gone (on this host), or whose lease ran out (its holder stopped renewing it:
   * paused, stuck, or on another host), is moved aside and taken over. The lock names a generation above
   * every one this thread has seen, the displaced lock's included (see GenRecord).
   */
  private async acquireLock(index: ThreadIndex): Promise<void> {
    const lock = join(index.dir, LOCK);
    let floor = 0;
    for (let attempt = 0; attempt < 5; attempt += 1) {
      const gen = Math.max(floor, index.maxGen) + 1;
      const mine: LockHolder = { pid: this.pid, host: hostname(), since: new Date().toISOString(), saver: this.saverId, gen, lease: this.leaseMs };
      const tmp = join(index.dir, `.${LOCK}.${this.saverId}`);
      await this.fs.writeFile(tmp, JSON.stringify(mine) + "\n");
      try {
        await this.fs.link(tmp, lock);
        this.holdLock(index, gen);
        return;
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      } finally {
        await this.fs.unlink(tmp).catch(() => {});
      }
      const holder = await readLock(this.fs, lock);
      if (holder === "missing") continue; // released meanwhile: try again
      if (holder !== "garbled" && holder.saver === this.saverId) {
        this.holdLock(index, holder.gen ?? gen);
        return;
      }
      if (holder === "garbled" || isStale(holder)) {
        if (holder !== "garbled") floor = Math.max(floor, holder.gen ?? 0);
        await this.moveStaleLock(lock, holder);
        continue;
      }
      throw lockedBy(index.thread, lock, holder);
    }
    throw new CairnError("THREAD_LOCKED", `Could not take the writer lock ${lock} of thread "${index.thread}" (it kept changing). Try again.`, {
      thread: index.thread,
      file: lock,
    });
  }

  /** Note the lock as held and keep its lease alive: the lock file's mtime is touched every third of it. */
  private holdLock(index: ThreadIndex, gen: number): void {
    index.locked = true;
    index.myGen = gen;
    clearInterval(index.heartbeat);
    const lock = join(index.dir, LOCK);
    // Touching a lock that is no longer ours (taken over meanwhile) only lengthens its holder's lease.
    index.heartbeat = setInterval(() => {
      const now = new Date();
      this.fs.utimes(lock, now, now).catch(() => {});
    }, Math.max(10, Math.floor(this.leaseMs / 3)));
    index.heartbeat.unref();
  }

  /** The lease this saver's locks are taken with (`CAIRN_LEASE_MS` when the saver was made, else 30 s). */
  private readonly leaseMs = leaseMs();

  /**
   * Move a dead holder's lock aside. Between reading the lock and moving it, another process may have
   * taken it over; so the moved file is read back, and if it is not the lock judged dead it is put back.
   */
  private async moveStaleLock(lock: string, judged: LockHolder | "garbled"): Promise<void> {
    const aside = `${lock}.stale-${this.saverId}`;
    try {
      await this.fs.rename(lock, aside);
    } catch {
      return; // gone already: someone else moved or released it
    }
    const moved = await readLock(this.fs, aside);
    const same = judged === "garbled" ? moved === "garbled" : typeof moved === "object" && moved.saver === judged.saver;
    if (!same) await this.fs.link(aside, lock).catch(() => {});
    await this.fs.unlink(aside).catch(() => {});
  }

  /**
   * Before each batch: this saver still holds the thread's lock (its content names this saver: inode
   * numbers are reused as soon as a file is removed, so they cannot tell one lock file from the next).
   * This is a fast way to stop, not the fence: a writer paused between this check and its append is
   * fenced by the generations (see GenRecord).
   */
  private async checkStillWriter(index: ThreadIndex): Promise<void> {
    const lock = join(index.dir, LOCK);
    const holder = await readLock(this.fs, lock).catch(() => "missing" as const);
    if (typeof holder === "object" && holder.saver === this.saverId) return;
    clearInterval(index.heartbeat);
    throw new CairnError(
      "THREAD_LOCKED",
      `This process no longer holds the writer lock of thread "${index.thread}" (${lock} was removed or taken over, its lease ran out, or the thread was deleted), so it stopped writing. ` +
        `Check \`cairn threads\` for another run of this thread before resuming it.`,
      { thread: index.thread, file: lock, lost: true },
    );
  }

  private async releaseLock(index: ThreadIndex): Promise<void> {
    clearInterval(index.heartbeat);
    index.heartbeat = undefined;
    const lock = join(index.dir, LOCK);
    const holder = await readLock(this.fs, lock);
    if (typeof holder === "object" && holder.saver === this.saverId) await this.fs.unlink(lock).catch(() => {});
    index.locked = false;
    index.myGen = undefined;
  }

  /**
   * Take the thread's writer lock now, or fail with THREAD_LOCKED
   * naming the holder. A thread that does not exist yet is locked by its first write. Held until
   * {@link close}.
   */
  async lockThread(threadId: string): Promise<void> {
    const index = await this.index(threadId, true);
    if (!index) return;
    // Only the lock: the journal is opened (and the generation's `gen` record appended) by the first
    // write, so a run refused after this point leaves the thread's files as they were.
    await this.gate(threadId).shared(async () => {
      if (!index.locked) await this.acquireLock(index);
    });
  }

  /** Who holds the thread's writer lock, if anyone. */
  async lockHolder(threadId: string): Promise<(PublicHolder & { stale: boolean; mine: boolean }) | undefined> {
    const holder = await readLock(this.fs, join(this.threadDir(threadId), LOCK));
    if (holder === "missing") return undefined;
    if (holder === "garbled") return { pid: 0, host: "?", since: "?", stale: true, mine: false };
    return { pid: holder.pid, host: holder.host, since: holder.since, expires: holder.expires, stale: isStale(holder), mine: holder.saver === this.saverId };
  }

  /**
   * Break the thread's writer lock: a stale one always, a live one only with `force`. First a `gen`
   * record above the holder's generation is appended to the journal, so nothing that holder writes
   * afterwards is ever read (it stops with THREAD_LOCKED at its next write); then the lock is removed.
   */
  async unlockThread(threadId: string, force: boolean): Promise<PublicHolder | undefined> {
    const dir = this.threadDir(threadId);
    const lock = join(dir, LOCK);
    const holder = await readLock(this.fs, lock);
    if (holder === "missing") return undefined;
    if (holder !== "garbled" && !force && !isStale(holder)) throw lockedBy(threadId, lock, holder);
    const index = await this.index(threadId, true);
    if (index) {
      const fence = Math.max(index.maxGen, holder === "garbled" ? 0 : (holder.gen ?? 0)) + 1;
      const json = withGen(JSON.stringify({ k: "gen", at: new Date().toISOString(), unlock: true } satisfies Omit<GenRecord, "g">), fence);
      // A holder cut off mid-write may have left a line without its newline: start a fresh line.
      const h = await this.fs.open(index.file, "a+");
      try {
        const size = (await h.stat()).size;
        const tail = Buffer.alloc(size > 0 ? 1 : 0);
        if (size > 0) await h.read(tail, 0, 1, size - 1);
        const line = (tail.length && tail[0] !== 0x0a ? "\n" : "") + encodeLine(json, size);
        await writeAll(h, Buffer.from(line, "utf8"));
        await h.datasync();
      } finally {
        await h.close();
      }
    }
    await this.moveStaleLock(lock, holder);
    return holder === "garbled" ? undefined : { pid: holder.pid, host: holder.host, since: holder.since, expires: holder.expires };
  }

  private async createThread(thread: string): Promise<void> {
    await this.ensureMarker();
    const dir = this.threadDir(thread);
    await this.fs.mkdir(dir);
    const header: HeaderRecord = {
      k: "hdr",
      format: "cairn-journal",
      v: FILE_STORE_FORMAT_VERSION,
      thread,
      created: new Date().toISOString(),
      id: `${this.saverId}-${(this.tmpCount += 1)}`,
    };
    const file = join(dir, JOURNAL);
    try {
      // Exclusive create: a journal another process made meanwhile is used as it is, never overwritten.
      await createJournal(this.fs, file, JSON.stringify(header));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") throw error;
      if (await hasHeader(this.fs, file)) return;
      // A creation a crash cut short holds no record at all: set it aside and create the journal again.
      await this.fs.rename(file, `${file}.unfinished-${this.saverId}`);
      await createJournal(this.fs, file, JSON.stringify(header));
    }
    // The new journal's directory entry, and the thread folder's, must survive a crash too.
    await fsyncDir(dir, this.fs);
    await fsyncDir(this.threadsDir, this.fs);
  }

  private ensureMarker(): Promise<void> {
    this.markerWritten ??= this.writeMarker().then(() => this.removeStoreLeftovers());
    this.markerWritten.catch(() => {
      this.markerWritten = undefined;
    });
    return this.markerWritten;
  }

  private async writeMarker(): Promise<void> {
    await this.checkMarker();
    const marker = join(this.dir, STORE_MARKER);
    try {
      if ((await this.fs.stat(marker)).size > 0) return;
    } catch {
      // first write to this store
    }
    await this.fs.mkdir(this.threadsDir);
    const body = JSON.stringify({ format: "cairn-file-store", version: FILE_STORE_FORMAT_VERSION }, null, 2) + "\n";
    const tmp = `${marker}.tmp-${this.saverId}`;
    const handle = await this.fs.open(tmp, "w");
    try {
      await writeAll(handle, Buffer.from(body, "utf8"), 0);
      await handle.sync();
    } finally {
      await handle.close();
    }
    try {
      await this.fs.rename(tmp, marker);
    } catch (error) {
      // Another saver writing the marker at the same time removed this one's temporary file as a
      // leftover after its own marker was in place: that marker is the same.
      if ((error as NodeJS.ErrnoException).code !== "ENOENT" || !((await this.fs.stat(marker).catch(() => undefined))?.size ?? 0)) throw error;
    }
    await fsyncDir(this.dir, this.fs);
    await fsyncDir(dirname(resolve(this.dir)), this.fs);
  }

  /**
   * Remove what interrupted writers left at the top of the store: a marker's temporary file
   * (`cairn-store.json.tmp-…`), and a deleted thread's folder renamed aside (`threads/.deleted-…`) but not
   * yet removed. Neither is ever read. Run once per saver, when it first writes.
   */
  private async removeStoreLeftovers(): Promise<void> {
    for (const name of await this.fs.readdir(this.dir).catch(() => [] as string[])) {
      if (name.startsWith(`${STORE_MARKER}.tmp-`) && !name.endsWith(this.saverId)) await this.fs.unlink(join(this.dir, name)).catch(() => {});
    }
    for (const name of await this.fs.readdir(this.threadsDir).catch(() => [] as string[])) {
      if (name.startsWith(".deleted-") && !name.startsWith(`.deleted-${this.saverId}-`)) await this.fs.rmTree(join(this.threadsDir, name)).catch(() => {});
    }
  }

  private checkMarker(): Promise<void> {
    this.markerChecked ??= (async () => {
      const marker = join(this.dir, STORE_MARKER);
      let text: string;
      try {
        text = (await this.fs.readFile(marker)).toString("utf8");
      } catch {
        return;
      }
      // An empty marker is one a crash left before its contents reached the disk; it is rewritten.
      if (text.trim() === "") return;
      let version: unknown;
      try {
        version = (JSON.parse(text) as { version?: unknown }).version;
      } catch (cause) {
        throw new CairnError("CHECKPOINT_CORRUPT", `Store marker ${marker} is not valid JSON. Restore it (it reads {"format":"cairn-file-store","version":${FILE_STORE_FORMAT_VERSION}}) or move the store aside; \`cairn verify\` checks the rest of the store.`, { file: marker }, { cause });
      }
      if (typeof version === "number" && version > FILE_STORE_FORMAT_VERSION) throw newerFormat(marker, version);
    })();
    this.markerChecked.catch(() => {
      this.markerChecked = undefined;
    });
    return this.markerChecked;
  }

  // ---------------------------------------------------------------------------------------------
  // Damage

  private noteDamage(index: ThreadIndex, loc: RecordLocation, why: string, held: JournalDamage["held"]): void {
    if (index.damage.has(loc.offset)) return;
    const d: JournalDamage = { file: index.file, offset: loc.offset, length: loc.length, why, setAside: index.aside.has(loc.offset) };
    if (held) d.held = held;
    index.damage.set(loc.offset, d);
  }

  /**
   * Check one thread's journal: every record's checksum and structure (read on every scan), and every
   * checkpoint read back whole: its record, each value it reads (decoded with the serializer) and its
   * saved task results. Undefined for an unknown thread. A journal that cannot be read at all (emptied,
   * written by a newer cairn) throws CHECKPOINT_CORRUPT.
   */
  async verifyThread(thread: string): Promise<ThreadVerification | undefined> {
    return this.gate(thread).shared(async () => {
      const index = await this.index(thread, true);
      if (!index) return undefined;
      const { affected, checkpoints, intact } = await this.assess(index, true);
      return { thread, file: index.file, checkpoints, intact, damage: [...index.damage.values()].sort((a, b) => a.offset - b.offset), affected };
    });
  }

  /**
   * Accept a thread's damage so the thread can go on from the newest checkpoint left intact: appends a
   * record naming the damaged byte ranges and the checkpoints they make unservable (the damaged ones, and
   * those reading a value or task result from damage). From then on those checkpoints are never served
   * (by any saver, in any process) and the thread reads and writes normally; new records go after the
   * damage, which stays in the file for inspection until a compaction drops it. Returns what was set
   * aside (nothing when the thread had no damage not yet set aside).
   */
  async setAsideDamage(thread: string): Promise<{ damage: JournalDamage[]; skipped: DamagedCheckpoint[] }> {
    return this.gate(thread).shared(async () => {
      const index = await this.writableIndex(thread, true);
      const open = [...index.damage.values()].filter((d) => !d.setAside);
      if (open.length === 0) return { damage: [], skipped: [] };
      const { affected } = await this.assess(index, false);
      const record: AsideRecord = {
        k: "aside",
        at: new Date().toISOString(),
        ranges: open.map((d) => ({ offset: d.offset, length: d.length, why: d.why })),
        checkpoints: affected.map((a) => a.checkpoint),
      };
      await index.writer!.append(JSON.stringify(record));
      for (const d of open) {
        index.aside.add(d.offset);
        d.setAside = true;
      }
      const roots = index.checkpoints.get("");
      for (const id of record.checkpoints) {
        roots?.delete(id);
        index.writes.delete(cpKey("", id));
      }
      index.sorted.set("", undefined);
      return { damage: open, skipped: affected };
    });
  }

  /** Which root checkpoints the thread's damage not yet set aside makes unservable, and why. */
  private async assess(index: ThreadIndex, decode: boolean): Promise<{ affected: DamagedCheckpoint[]; checkpoints: number; intact: number }> {
    const open = [...index.damage.values()].filter((d) => !d.setAside);
    const affected = new Map<string, string>();
    const roots = [...(index.checkpoints.get("")?.values() ?? [])].sort((a, b) => a.offset - b.offset);
    for (const d of open) {
      const held = d.held;
      if (held?.kind === "checkpoint" && held.checkpoint && held.ns === "") {
        affected.set(held.checkpoint, `its record at byte ${d.offset} is damaged (${d.why})`);
      } else if (held?.kind === "writes" && held.checkpoint && held.ns === "") {
        affected.set(held.checkpoint, `its saved task results at byte ${d.offset} are damaged (${d.why})`);
      } else if (held?.kind !== "header" && held?.kind !== "end") {
        // What the record held cannot be told: it may have been task results of the checkpoint before it.
        const before = roots.filter((r) => r.offset < d.offset).at(-1);
        if (before && !affected.has(before.id)) {
          affected.set(before.id, `the record after it at byte ${d.offset} is damaged beyond telling what it held, and may have held its saved task results`);
        }
      }
    }
    let checkpoints = 0;
    let intact = 0;
    for (const [ns, byId] of index.checkpoints) {
      for (const entry of byId.values()) {
        checkpoints += 1;
        let problem: string | undefined;
        try {
          const rec = await this.read<CheckpointRecord>(index, entry, "cp", entry.id);
          if (open.length > 0) {
            const lost = Object.entries(rec.cp.channel_versions).find(([channel, version]) => !index.blobs.has(blobKey(ns, channel, version)));
            if (lost) problem = `its value of "${lost[0]}" was in a damaged record`;
          }
          if (!problem && decode) await this.loadTuple(index, ns, entry);
        } catch (error) {
          problem = `it does not read back: ${(error as Error).message}`;
        }
        const key = ns === "" ? entry.id : `${ns}/${entry.id}`;
        if (problem && !affected.has(key)) affected.set(key, problem);
        if (!affected.has(key)) intact += 1;
      }
    }
    return { affected: [...affected].map(([checkpoint, why]) => ({ checkpoint, why })), checkpoints, intact };
  }

  // ---------------------------------------------------------------------------------------------
  // Maintenance

  /**
   * Delete checkpoints of a thread's root namespace, with their pending writes and readable step files,
   * by compacting its journal. The thread's newest checkpoint is never deleted (ids naming it, or no
   * checkpoint of the thread, are passed over); checkpoints of nested namespaces (subgraphs) are kept.
   *
   * The compacted journal holds the kept checkpoints in their order, each carrying the channel values
   * it reads from a record that is dropped, their pending writes, and a new header id (so other
   * processes reading the thread rebuild their index). It is written to `journal.log.compact-…`,
   * fsynced, renamed over `journal.log`, and the folder fsynced: a crash at any point leaves the old
   * journal or the new one, never a mix (an unfinished `compact-` file is never read, and is removed
   * by the next writer). The thread's writer lock is held throughout: a thread another live process
   * writes is refused with `THREAD_LOCKED`; within this saver, reads and writes wait for it.
   *
   * With `dryRun`, nothing is written and `bytesFreed` is what the compaction would free.
   */
  async deleteCheckpoints(thread: string, ids: readonly string[], options: { dryRun?: boolean } = {}): Promise<DeletedCheckpoints> {
    return this.gate(thread).exclusive(() => this.compact(thread, new Set(ids), options.dryRun === true));
  }

  /** Bytes the thread's folder takes on disk (journal, step files, lock): 0 for an unknown thread. */
  async threadBytes(thread: string): Promise<number> {
    return folderBytes(this.fs, this.threadDir(thread));
  }

  private async compact(thread: string, wanted: Set<string>, dryRun: boolean): Promise<DeletedCheckpoints> {
    const index = await this.index(thread);
    if (!index) return { deleted: [], bytesFreed: 0 };
    if (index.writer?.broken) {
      throw new CairnError(
        "STORE_UNAVAILABLE",
        `Thread "${thread}" cannot be compacted: an earlier write to ${index.file} failed in this process. Resume the thread in a new process first.`,
        { thread, file: index.file },
      );
    }
    const lock = join(index.dir, LOCK);
    let tookLock = false;
    if (dryRun) {
      // Reported as the real compaction would meet it, without taking anything.
      const holder = await readLock(this.fs, lock);
      if (typeof holder === "object" && holder.saver !== this.saverId && !isStale(holder)) throw lockedBy(thread, lock, holder);
    } else if (!index.locked) {
      await this.acquireLock(index);
      tookLock = true;
    } else {
      await this.checkStillWriter(index);
    }
    try {
      // This saver's writer knows every record it appended; otherwise read what others committed, under the lock.
      if (!index.writer) await this.refresh(index);
      const roots = index.checkpoints.get("") ?? new Map<string, CheckpointEntry>();
      const newest = this.sortedIds(index, "")[0];
      const doomed = new Set([...wanted].filter((id) => roots.has(id) && id !== newest));
      if (doomed.size === 0) return { deleted: [], bytesFreed: 0 };
      const stepFiles = await this.stepFilesOf(index, doomed);
      const stepBytes = stepFiles.reduce((sum, f) => sum + f.size, 0);
      const handle = await this.fs.open(index.file, "r");
      let header: HeaderRecord | undefined;
      let journalSize: number;
      try {
        journalSize = (await handle.stat()).size;
        header = await readHeader(handle, journalSize);
      } finally {
        await handle.close();
      }
      const now = new Date().toISOString();
      const fresh: HeaderRecord = {
        k: "hdr",
        format: "cairn-journal",
        v: FILE_STORE_FORMAT_VERSION,
        thread,
        created: header?.created ?? now,
        id: `${this.saverId}-${(this.tmpCount += 1)}`,
        compacted: { at: now, removed: (header?.compacted?.removed ?? 0) + doomed.size },
      };
      // The new journal is this holder's generation throughout (its header sets it; its records carry it).
      const records = withGenerations(this.compactedRecords(index, doomed, fresh), index.myGen ?? index.gen);
      if (dryRun) {
        let size = 0;
        for await (const json of records) size += Buffer.byteLength(encodeLine(json, size));
        return { deleted: [...doomed], bytesFreed: Math.max(0, journalSize - size) + stepBytes };
      }

      await removeUnfinishedCompactions(this.fs, index.dir);
      const before = await folderBytes(this.fs, index.dir);
      if (!index.writer && journalSize > index.validEnd) {
        // A torn tail is left out of the new journal; its bytes are kept aside, as a writer would.
        const tail = Buffer.alloc(journalSize - index.validEnd);
        const h = await this.fs.open(index.file, "r");
        try {
          await h.read(tail, 0, tail.length, index.validEnd);
        } finally {
          await h.close();
        }
        await this.fs.writeFile(`${index.file}.cut-${index.validEnd}`, tail);
      }
      const tmp = join(index.dir, `${COMPACTING}${this.saverId}-${(this.tmpCount += 1)}`);
      await writeJournal(this.fs, tmp, records);
      try {
        await this.checkStillWriter(index);
        // The commit point: once renamed (and the folder fsynced), readers find only the new journal.
        await this.fs.rename(tmp, index.file);
      } catch (error) {
        await this.fs.unlink(tmp).catch(() => {});
        throw error;
      }
      await fsyncDir(index.dir, this.fs);
      await this.reopen(index);
      // The readable view of removed checkpoints goes too (after the commit: a crash may leave some).
      for (const f of stepFiles) await this.fs.unlink(join(index.dir, f.name)).catch(() => {});
      const after = await folderBytes(this.fs, index.dir);
      return { deleted: [...doomed], bytesFreed: Math.max(0, before - after) };
    } finally {
      if (tookLock) await this.releaseLock(index);
    }
  }

  /**
   * The records of a compacted journal, in their old order: the new header, every kept checkpoint (with
   * the values it reads from dropped records copied in, and its order as `n`), the write records of kept
   * checkpoints, and an `end` record (everything in it is committed).
   */
  private async *compactedRecords(index: ThreadIndex, doomed: Set<string>, header: HeaderRecord): AsyncGenerator<string> {
    yield JSON.stringify(header);
    type Item = { offset: number; cp?: { ns: string; entry: CheckpointEntry }; w?: RecordLocation };
    const items: Item[] = [];
    const kept = new Set<string>();
    for (const [ns, byId] of index.checkpoints) {
      for (const entry of byId.values()) {
        if (ns === "" && doomed.has(entry.id)) continue;
        items.push({ offset: entry.offset, cp: { ns, entry } });
        kept.add(cpKey(ns, entry.id));
      }
    }
    const writes = new Map<number, RecordLocation>();
    for (const [key, list] of index.writes) if (kept.has(key)) for (const e of list) writes.set(e.loc.offset, e.loc);
    for (const loc of writes.values()) items.push({ offset: loc.offset, w: loc });
    items.sort((a, b) => a.offset - b.offset);

    // (ns, channel, version) of every value the new journal holds so far.
    const carried = new Set<string>();
    for (const item of items) {
      if (item.w) {
        yield JSON.stringify(await this.read<WritesRecord>(index, item.w, "w"));
        continue;
      }
      const { ns, entry } = item.cp!;
      const rec = await this.read<CheckpointRecord>(index, entry, "cp", entry.id);
      const out: CheckpointRecord = { ...rec, blobs: { ...rec.blobs } };
      if (ns === "") out.n = entry.order;
      for (const [channel, blob] of Object.entries(rec.blobs)) carried.add(blobKey(ns, channel, blob.ver));
      const needed = new Map<number, { loc: RecordLocation; channels: string[] }>();
      for (const [channel, version] of Object.entries(rec.cp.channel_versions)) {
        if (carried.has(blobKey(ns, channel, version))) continue;
        const loc = index.blobs.get(blobKey(ns, channel, version));
        if (!loc) continue; // never stored: the checkpoint reads no value for it now either
        const group = needed.get(loc.offset) ?? { loc, channels: [] };
        group.channels.push(channel);
        needed.set(loc.offset, group);
      }
      for (const { loc, channels } of needed.values()) {
        const holder = await this.read<CheckpointRecord>(index, loc, "cp");
        for (const channel of channels) {
          const blob = holder.blobs[channel];
          if (!blob) continue;
          if (channel in out.blobs) {
            throw new Error(`BUG: checkpoint ${rec.id} of thread ${index.thread} reads two versions of channel ${channel}; nothing was compacted`);
          }
          out.blobs[channel] = blob;
          carried.add(blobKey(ns, channel, blob.ver));
        }
      }
      yield JSON.stringify(out);
    }
    yield JSON.stringify({ k: "end", at: new Date().toISOString() } satisfies EndRecord);
  }

  /** After the journal was replaced: forget what the index knew, read the new journal, reopen the writer. */
  private async reopen(index: ThreadIndex): Promise<void> {
    const wasWriter = index.writer !== undefined;
    await index.writer?.close();
    await index.reader?.close();
    Object.assign(index, {
      writer: undefined,
      opening: undefined,
      reader: undefined,
      journalId: undefined,
      ...emptyIndexState(),
    } satisfies Partial<ThreadIndex>);
    await this.refresh(index);
    // On failure the next write opens the writer again (the lock is still this saver's).
    if (wasWriter) await this.openWriter(index, index.myGen ?? index.gen);
  }

  /**
   * Open the thread's journal for appending (under its lock), as generation `gen`. A torn tail is cut; a
   * trailing `end` record (the journal was closed cleanly) is taken off: from here on the journal is being
   * written, and a crash may tear the next write, which must then read as a torn tail, not as damage after
   * a clean close. The `end` record holds nothing else, so a crash before or after its removal loses nothing.
   */
  private async openWriter(index: ThreadIndex, gen: number): Promise<void> {
    // With damage in the journal the `end` record stays: taken off, the damaged line before it would sit
    // right before this writer's `gen` record and read as a stopped writer's unfinished write.
    const cleanEnd = index.validEnd === index.endAt || index.damage.size > 0 ? undefined : index.endAt;
    index.writer = await JournalWriter.open(this.fs, index.file, index.validEnd, () => this.checkStillWriter(index), index.thread, cleanEnd, gen, () => {
      clearInterval(index.heartbeat);
      return lostLock(index.thread, join(index.dir, LOCK), { file: index.file });
    });
    if (cleanEnd !== undefined) {
      index.validEnd = cleanEnd;
      index.endAt = undefined;
      index.lastKind = "cp";
    }
  }

  /** The readable step files of these checkpoints (named by their order; each names its checkpoint). */
  private async stepFilesOf(index: ThreadIndex, ids: Set<string>): Promise<{ name: string; size: number }[]> {
    const roots = index.checkpoints.get("")!;
    const orders = new Set([...ids].map((id) => roots.get(id)!.order));
    const out: { name: string; size: number }[] = [];
    for (const name of await this.fs.readdir(index.dir).catch(() => [] as string[])) {
      const m = /^(\d+)-.*\.json$/.exec(name);
      if (!m || !orders.has(Number(m[1]))) continue;
      const path = join(index.dir, name);
      const handle = await this.fs.open(path, "r").catch(() => undefined);
      if (!handle) continue;
      try {
        const head = Buffer.alloc(4096);
        const { bytesRead } = await handle.read(head, 0, head.length, 0);
        const id = /"checkpoint": "([^"]*)"/.exec(head.toString("utf8", 0, bytesRead))?.[1];
        if (id !== undefined && ids.has(id)) out.push({ name, size: (await handle.stat()).size });
      } finally {
        await handle.close();
      }
    }
    return out;
  }

  // ---------------------------------------------------------------------------------------------
  // The readable view

  /**
   * Write `NNNN-<step>.json`: what the step that produced this checkpoint wrote (its task writes, as the
   * step returned them), pretty-printed. A view only: no fsync, and a crash may leave the newest one missing.
   */
  private async writeStepFile(index: ThreadIndex, checkpoint: Checkpoint, metadata: CheckpointMetadata, parent: string | null) {
    const cairn = (metadata as { cairn?: { step?: unknown } }).cairn;
    const prevSeen = this.lastSeen.get(index.thread);
    this.lastSeen.set(index.thread, checkpoint.versions_seen);
    let step: string;
    if (typeof cairn?.step === "string" && cairn.step) step = cairn.step;
    else if (metadata.source === "input") step = "input";
    else if (metadata.source === "fork" || metadata.source === "update") step = metadata.source;
    else step = nodesThatRan(prevSeen, checkpoint.versions_seen).join("+") || "step";

    const produced: Record<string, Record<string, unknown>> = {};
    if (parent) {
      for (const [task, channel, value] of await this.loadWrites(index, "", parent)) {
        if (!isReadableChannel(channel)) continue;
        (produced[task] ??= {})[channel] = value;
      }
    }
    const tasks = Object.values(produced);
    const body = {
      step,
      checkpoint: checkpoint.id,
      parent,
      source: metadata.source,
      ts: checkpoint.ts,
      metadata,
      produced: tasks.length === 1 ? tasks[0] : tasks,
    };
    const name = stepFileName(index.rootCount, step);
    const tmp = join(index.dir, `.${name}.${this.saverId}-${(this.tmpCount += 1)}.tmp`);
    try {
      await this.fs.writeFile(tmp, JSON.stringify(body, jsonForView, 2) + "\n");
      await this.fs.rename(tmp, join(index.dir, name));
    } catch (error) {
      await this.fs.unlink(tmp).catch(() => {});
      // The checkpoint is already saved; a missing view is not worth failing the step for, but a full
      // or failing disk is: the next step's checkpoint could not be saved either, so stop before it runs.
      if (isStorageFailure(error)) {
        throw storageError(error, {
          file: join(index.dir, name),
          thread: index.thread,
          what: `writing the readable step file of checkpoint ${checkpoint.id}`,
          intact: `the checkpoint itself is saved (only its readable view is missing)`,
        });
      }
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Values

  private async encode(value: unknown): Promise<string> {
    if (value === undefined) return `{"t":"undefined"}`;
    if (this.plainJson) {
      // The same text the serializer writes, without its copy to bytes and back.
      const text = plainJsonText(value);
      if (text !== undefined) return `{"t":"json","d":${text}}`;
    }
    const [type, data] = await this.serde.dumpsTyped(value);
    if (type === "json") {
      let text = typeof data === "string" ? data : Buffer.from(data).toString("utf8");
      if (text === "") return `{"t":"undefined"}`;
      // A record is one line: a serializer that pretty-prints gets its JSON compacted.
      if (text.includes("\n")) text = JSON.stringify(JSON.parse(text));
      return `{"t":"json","d":${text}}`;
    }
    const bytes = typeof data === "string" ? Buffer.from(data, "utf8") : Buffer.from(data);
    return JSON.stringify({ t: type, b64: bytes.toString("base64") });
  }

  /**
   * `shared`: the record holding the value stays cached for later reads, so the caller gets a copy (a
   * step may change what it was given).
   */
  private async decode(value: EncodedValue, shared = false): Promise<unknown> {
    if (value.t === "undefined" || value.t === "empty") return undefined;
    if ("d" in value) {
      // Plain JSON is its own decoding: the record's parse already built the value.
      if (this.plainJson && !needsRevive(value.d)) return shared ? structuredClone(value.d) : value.d;
      return this.serde.loadsTyped("json", JSON.stringify(value.d));
    }
    if ("b64" in value) return this.serde.loadsTyped(value.t, new Uint8Array(Buffer.from(value.b64, "base64")));
    return undefined;
  }
}

/** What a thread's index knows from scanning its journal, as before any scan: set when the journal is replaced. */
function emptyIndexState() {
  return {
    validEnd: 0,
    rootCount: 0,
    lastKind: undefined,
    endAt: undefined,
    checkpoints: new Map(),
    sorted: new Map(),
    blobs: new Map(),
    writes: new Map(),
    writeCache: undefined,
    writeCacheBytes: 0,
    damage: new Map(),
    aside: new Set(),
    gen: 0,
    maxGen: 0,
    fenced: 0,
  } satisfies Partial<ThreadIndex>;
}

function requireThread(config: RunnableConfig, action: string): string {
  const thread = config.configurable?.thread_id as unknown;
  if (typeof thread !== "string" || thread === "") {
    throw new CairnError("INVALID_ARGUMENT", `Cannot ${action}: the config has no configurable.thread_id. Pass { configurable: { thread_id } }.`);
  }
  return thread;
}

/** `{"t":...}` → `{"ver":...,"t":...}` without re-parsing the value. */
function injectVersion(encoded: string, version: string | number): string {
  return `{"ver":${JSON.stringify(version)},${encoded.slice(1)}`;
}

function matchesFilter(metadata: unknown, filter: Record<string, unknown>): boolean {
  const md = (metadata ?? {}) as Record<string, unknown>;
  return Object.entries(filter).every(([k, v]) => JSON.stringify(md[k]) === JSON.stringify(v));
}

/** Channels worth showing in a step file: state fields, and a fan-out item's result. */
function isReadableChannel(channel: string): boolean {
  return channel.startsWith(MAP_PREFIX) || !isInternalChannel(channel);
}

function jsonForView(_key: string, value: unknown): unknown {
  if (value instanceof Uint8Array) return `<${value.length} bytes>`;
  if (typeof value === "bigint") return value.toString();
  return value;
}

function newerFormat(file: string, version: number): CairnError {
  return new CairnError(
    "CHECKPOINT_CORRUPT",
    `${file} was written by a newer cairn (format version ${version}; this cairn reads up to ${FILE_STORE_FORMAT_VERSION}). Upgrade cairn to read this store.`,
    { file },
  );
}

/** The id in a journal's header record ("" for a header without one, undefined if none is complete yet). */
async function headerId(handle: StoreFileHandle, size: number): Promise<string | undefined> {
  const record = await readHeader(handle, size);
  return record ? (record.id ?? "") : undefined;
}

/** A journal's header record, if a complete one starts the file. */
async function readHeader(handle: StoreFileHandle, size: number): Promise<HeaderRecord | undefined> {
  const head = Buffer.alloc(Math.min(size, 4096));
  await handle.read(head, 0, head.length, 0);
  const nl = head.indexOf(0x0a);
  if (nl === -1) return undefined;
  const line = decodeLine(head.toString("utf8", 0, nl));
  if (!line) return undefined;
  const record = JSON.parse(line.json) as Partial<HeaderRecord>;
  return record.k === "hdr" ? (record as HeaderRecord) : undefined;
}

/** Whether a journal starts with a complete, intact header record. */
async function hasHeader(fs: StoreFs, file: string): Promise<boolean> {
  const text = (await fs.readFile(file).catch(() => Buffer.alloc(0))).toString("utf8");
  const nl = text.indexOf("\n");
  if (nl === -1) return false;
  const line = decodeLine(text.slice(0, nl));
  return line !== undefined && (JSON.parse(line.json) as { k?: unknown }).k === "hdr";
}

function lockedBy(thread: string, lock: string, holder: LockHolder): CairnError {
  const who = holder.pid === process.pid && holder.host === hostname() ? "another store object in this process" : `pid ${holder.pid} on ${holder.host}`;
  return new CairnError(
    "THREAD_LOCKED",
    `Thread "${thread}" is being written by ${who} since ${holder.since}${holder.expires ? ` (lease until ${holder.expires})` : ""}; a thread has one writer at a time. ` +
      `Wait for that run to finish or stop it. If that process is stuck, \`cairn unlock ${thread} --force\` breaks its lock (${lock}); it then cannot write again.`,
    { thread, file: lock, holder: { pid: holder.pid, host: holder.host, since: holder.since, expires: holder.expires }, hint: `cairn unlock ${thread} --force` },
  );
}

/**
 * Write a whole journal to a new file and make it durable. Each line is its own batch (its own offset):
 * everything in it is committed, so a bad line followed by a good one is reported as damage, never
 * taken for a torn tail.
 */
async function writeJournal(fs: StoreFs, file: string, records: AsyncIterable<string>): Promise<void> {
  const handle = await fs.open(file, "wx");
  try {
    let offset = 0;
    let chunk: Buffer[] = [];
    let chunkBytes = 0;
    let at = 0;
    const flush = async () => {
      const all = Buffer.concat(chunk);
      await writeAll(handle, all, at);
      at += all.length;
      chunk = [];
      chunkBytes = 0;
    };
    for await (const json of records) {
      const line = Buffer.from(encodeLine(json, offset), "utf8");
      offset += line.length;
      chunk.push(line);
      chunkBytes += line.length;
      if (chunkBytes >= 1 << 20) await flush();
    }
    await flush();
    // Whole on disk before it may replace the old journal.
    await handle.sync();
  } catch (error) {
    await handle.close().catch(() => {});
    await fs.unlink(file).catch(() => {});
    throw error;
  }
  await handle.close();
}

async function* withGenerations(records: AsyncIterable<string>, gen: number): AsyncGenerator<string> {
  for await (const json of records) yield withGen(json, gen);
}

/** Remove what a compaction cut short by a crash left: a journal never renamed into place. */
async function removeUnfinishedCompactions(fs: StoreFs, dir: string): Promise<void> {
  const names = await fs.readdir(dir).catch(() => [] as string[]);
  for (const name of names) if (name.startsWith(COMPACTING)) await fs.unlink(join(dir, name)).catch(() => {});
}

/**
 * What an interrupted writer of a thread can leave in its folder, besides the journal: each is never
 * read, and the next writer (holding the lock) removes those that are not its own.
 * - `journal.log.compact-…`: a compaction never renamed into place;
 * - `journal.log.unfinished-…`: a journal whose creation was cut short (it holds no complete record);
 * - `.writer.lock.<saver>`: a lock being taken (written, then linked as `writer.lock`);
 * - `writer.lock.stale-<saver>`: a dead holder's lock being moved aside;
 * - `.NNNN-<step>.json.<saver>.tmp`: a step file being written.
 * `journal.log.cut-<offset>` (bytes of a torn write cut off the journal) are kept for inspection.
 */
export function isThreadLeftover(name: string): boolean {
  return (
    name.startsWith(COMPACTING) ||
    name.startsWith(`${JOURNAL}.unfinished-`) ||
    name.startsWith(`.${LOCK}.`) ||
    name.startsWith(`${LOCK}.stale-`) ||
    /^\..*\.tmp$/.test(name)
  );
}

/** Remove a thread folder's leftovers (see isThreadLeftover) that this saver did not make. */
async function removeLeftovers(fs: StoreFs, dir: string, saverId: string): Promise<void> {
  const names = await fs.readdir(dir).catch(() => [] as string[]);
  for (const name of names) {
    // An unfinished journal is never anyone's to finish: its creator found the new journal in place.
    if (!isThreadLeftover(name) || (name.includes(saverId) && !name.startsWith(`${JOURNAL}.unfinished-`))) continue;
    await fs.unlink(join(dir, name)).catch(() => {});
  }
}

/** Bytes of the files in a folder (not below it); 0 for a folder that does not exist. */
async function folderBytes(fs: StoreFs, dir: string): Promise<number> {
  let names;
  try {
    names = await fs.readdir(dir);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return 0;
    throw error;
  }
  let total = 0;
  for (const name of names) {
    const s = await fs.stat(join(dir, name)).catch(() => undefined);
    if (s?.isFile()) total += s.size;
  }
  return total;
}

/** The lock's holder; "garbled" for a lock file that is not one cairn wrote whole (taken over as stale). */
async function readLock(fs: StoreFs, file: string): Promise<LockHolder | "missing" | "garbled"> {
  let text: string;
  let mtime: number;
  try {
    text = (await fs.readFile(file)).toString("utf8");
    mtime = (await fs.stat(file)).mtime.getTime();
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return "missing";
    throw error;
  }
  try {
    const holder = JSON.parse(text) as Partial<LockHolder>;
    if (typeof holder.pid !== "number" || typeof holder.saver !== "string") return "garbled";
    if (typeof holder.lease === "number") holder.expires = new Date(mtime + holder.lease).toISOString();
    return holder as LockHolder;
  } catch {
    return "garbled";
  }
}


/** What a damaged line held, as far as its bytes still tell. */
function identify(text: string): JournalDamage["held"] {
  const kind = /"k":"(cp|w|hdr|end)"/.exec(text)?.[1];
  const ns = /"ns":"((?:[^"\\]|\\.)*)"/.exec(text)?.[1] ?? "";
  if (kind === "cp") {
    const id = /"id":"([^"\\]+)"/.exec(text)?.[1];
    return id ? { kind: "checkpoint", ns, checkpoint: id } : { kind: "checkpoint", ns };
  }
  if (kind === "w") {
    const cp = /"cp":"([^"\\]+)"/.exec(text)?.[1];
    return cp ? { kind: "writes", ns, checkpoint: cp } : { kind: "writes", ns };
  }
  if (kind === "hdr") return { kind: "header" };
  if (kind === "end") return { kind: "end" };
  return undefined;
}

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/** What is structurally wrong with a record whose checksum holds (one cairn never wrote), if anything. */
function structureProblem(record: unknown): string | undefined {
  if (!isObject(record)) return "it is not a record (a JSON object)";
  switch (record.k) {
    case "hdr":
      return typeof record.v === "number" && typeof record.thread === "string" ? undefined : "the header record lacks its version or thread";
    case "cp": {
      const ok =
        typeof record.id === "string" &&
        typeof record.ns === "string" &&
        (record.parent === null || typeof record.parent === "string") &&
        isObject(record.cp) &&
        isObject(record.cp.channel_versions) &&
        isObject(record.md) &&
        isObject(record.blobs) &&
        Object.values(record.blobs).every((b) => isObject(b) && typeof b.t === "string");
      return ok ? undefined : "the checkpoint record lacks fields every checkpoint has (id, ns, parent, cp.channel_versions, md, blobs)";
    }
    case "w": {
      const ok =
        typeof record.ns === "string" &&
        typeof record.cp === "string" &&
        typeof record.task === "string" &&
        typeof record.path === "string" &&
        Array.isArray(record.w) &&
        record.w.every((w) => isObject(w) && typeof w.i === "number" && typeof w.ch === "string" && typeof w.t === "string");
      return ok ? undefined : "the task-results record lacks fields every one has (ns, cp, task, path, w)";
    }
    case "end":
      return undefined;
    case "gen":
      return typeof record.g === "number" && record.g > 0 ? undefined : "the generation record lacks its generation";
    case "aside":
      return Array.isArray(record.ranges) && Array.isArray(record.checkpoints) ? undefined : "the set-aside record lacks its ranges or checkpoints";
    default:
      return `its kind ${JSON.stringify(record.k)} is not one cairn writes`;
  }
}

/** A thread with damage not set aside is never read: say where, and the two ways on. */
function refuseDamage(index: ThreadIndex): void {
  const open = [...index.damage.values()].filter((d) => !d.setAside).sort((a, b) => a.offset - b.offset);
  const first = open[0];
  if (!first) return;
  const held =
    first.held?.kind === "checkpoint" && first.held.checkpoint
      ? `; it held checkpoint ${first.held.checkpoint}`
      : first.held?.kind === "writes" && first.held.checkpoint
        ? `; it held saved task results of checkpoint ${first.held.checkpoint}`
        : first.held?.kind === "header"
          ? "; it is the journal's header"
          : "";
  const thread = index.thread;
  throw new CairnError(
    "CHECKPOINT_CORRUPT",
    `Checkpoint journal ${first.file} of thread "${thread}" is damaged at byte ${first.offset}: ${first.why}${held}` +
      `${open.length > 1 ? ` (${open.length} damaged records in all)` : ""}. Nothing was loaded from it. ` +
      `See every damaged record with \`cairn verify ${thread}\`, or continue from the newest intact earlier checkpoint with \`cairn resume <graph.ts> --thread ${thread} --fallback\`.`,
    { file: first.file, offset: first.offset, thread, hint: `cairn verify ${thread}` },
  );
}
