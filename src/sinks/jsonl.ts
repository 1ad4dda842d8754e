import { mkdir, open, type FileHandle } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { CairnError } from "../errors.ts";
import { fsyncDir } from "../store/fsync.ts";

/**
 * An append-only JSONL dataset file that a pipeline step can write to idempotently.
 *
 * A fan-out item's result is checkpointed only after the item returns, so a crash between the item's
 * append and its checkpoint makes the item run again on resume. The sink remembers every record's key
 * (read back from the file when it is opened), so the re-run's append is a no-op and each key appears
 * in the file once across any number of crashes and resumes.
 *
 * Guarantees:
 * - Durable: `append` resolves `true` only after its line has been written and fdatasync'ed (a new file's
 *   directory entry is fsync'ed at open), so an acknowledged record survives a process kill or power loss.
 *   A failed write or fdatasync rejects, and the sink then refuses every later append: a failed fsync is
 *   never taken for success.
 * - Exactly once per key: an append whose key is in the file, or was appended earlier by this sink (even
 *   concurrently), resolves `false` and writes nothing.
 * - Crash-tolerant: a crash in the middle of an append leaves at most a torn last line. `open` cuts it off
 *   (that record was never acknowledged), keeping the cut bytes beside the file as `<path>.cut-<offset>`.
 *   Complete lines of an unacknowledged batch are kept: they are whole records, and their items' re-runs
 *   will find their keys.
 * - Never rewrites committed data: an unparsable line before the last one, or a line whose key cannot be
 *   computed, is reported as CHECKPOINT_CORRUPT and the file is left untouched. Duplicate keys already in
 *   the file are kept as they are and counted once.
 *
 * Limits:
 * - One writer per file: one process, and one sink in it, at a time. cairn's per-thread writer lock
 *   provides this when the path is per thread (e.g. `datasets/<thread>.jsonl`). A second writer is
 *   detected when the file grows under a sink and stops it, but not reliably prevented.
 * - The key must be a deterministic function of the item (its index, or a hash of its input), not of
 *   the generated content, which a re-run produces afresh. It must also give the same key for the record
 *   and for its JSON round trip, since `open` computes it from the parsed lines; `append` checks this.
 * - After a power loss (not a process crash) a filesystem may persist an unacknowledged write out of
 *   order, leaving a run of garbage before the file's last line; that is reported as damage, naming the
 *   line to remove.
 * - Blank lines are skipped, and a byte-order mark at the start of the file is ignored.
 *
 * Concurrent appends are group-committed: records queued while a write + fdatasync is in flight go to
 * disk together in the next single write + fdatasync, so a fan-out of hundreds of items pays for a few
 * syncs, not hundreds.
 *
 * @example
 * ```ts
 * const sink = await JsonlSink.open(`datasets/${thread}.jsonl`, { key: (r: Pair) => String(r.index) });
 * // in a fan-out item:
 * await sink.append({ index: ctx.index, chosen, rejected });
 * // when the run ends:
 * await sink.close();
 * ```
 */
export class JsonlSink<T> {
  /** Keys of the records durably in the file. */
  private readonly keys: Set<string>;
  /** Keys queued or being written, each with its first append's outcome. */
  private readonly pending = new Map<string, Promise<boolean>>();
  private queue: Queued[] = [];
  private writing = false;
  /** Settles when the current flush loop ends (it never rejects). */
  private idle: Promise<void> = Promise.resolve();
  private failed: { error: unknown } | undefined;
  private closing: Promise<void> | undefined;
  /** File size after the last committed batch. */
  private end: number;
  private committedBatches = 0;

  private constructor(
    readonly path: string,
    private readonly handle: FileHandle,
    private readonly keyOf: (record: T) => string,
    keys: Set<string>,
    end: number,
  ) {
    this.keys = keys;
    this.end = end;
  }

  /**
   * Open (or create, with its parent folders) a JSONL file for appending, reading every line's key.
   * A torn last line is cut off and the cut made durable before this resolves.
   *
   * @throws CairnError `CHECKPOINT_CORRUPT` when a line before the last is not valid JSON, or the key
   * cannot be computed for some line; the file is left unmodified.
   */
  static async open<T>(path: string, options: JsonlSinkOptions<T>): Promise<JsonlSink<T>> {
    if (typeof options?.key !== "function") {
      throw new CairnError("INVALID_ARGUMENT", `JsonlSink.open(${JSON.stringify(path)}) needs options.key, a function from a record to its key string.`, {
        file: path,
      });
    }
    const handle = await openOrCreate(path);
    try {
      const scan = await scanFile(path, handle, options.key);
      if (scan.size > scan.validEnd) await cutTail(path, handle, scan.validEnd, scan.size);
      return new JsonlSink<T>(path, handle, options.key, scan.keys, scan.validEnd);
    } catch (error) {
      await handle.close();
      throw error;
    }
  }

  /** Whether a record with this key is durably in the file (it was there at open, or its append resolved `true`). */
  has(key: string): boolean {
    return this.keys.has(key);
  }

  /** The number of distinct keys durably in the file. */
  get size(): number {
    return this.keys.size;
  }

  /**
   * Diagnostic: how many write + fdatasync commits this sink has made. Concurrent appends share one, so
   * this stays far below the number of appends when they overlap.
   */
  get batches(): number {
    return this.committedBatches;
  }

  /**
   * Append one record as a line of JSON, durably. Resolves `true` once it is written and fdatasync'ed,
   * `false` (writing nothing) when a record with its key is already in the file or being appended.
   *
   * @throws CairnError `INVALID_ARGUMENT` when the key cannot be computed (key() throws, or returns an
   * empty or non-string value), the record has no JSON form, or its key changes through a JSON round trip;
   * or when the sink is closed. `STORE_UNAVAILABLE` once an earlier write failed. A write or fdatasync
   * failure rejects the appends of its batch with the underlying error.
   */
  append(record: T): Promise<boolean> {
    if (this.closing !== undefined) {
      return Promise.reject(
        new CairnError("INVALID_ARGUMENT", `JsonlSink for ${this.path} is closed: open it again to append more records.`, { file: this.path }),
      );
    }
    if (this.failed !== undefined) return Promise.reject(this.failedError());
    let entry: { key: string; line: Buffer };
    try {
      entry = this.encode(record);
    } catch (error) {
      return Promise.reject(error);
    }
    const { key, line } = entry;
    if (this.keys.has(key)) return Promise.resolve(false);
    // The same key appended again before the first is committed: share its outcome, write nothing.
    const first = this.pending.get(key);
    if (first !== undefined) return first.then(() => false);
    const done = new Promise<boolean>((resolve, reject) => {
      this.queue.push({ key, line, resolve, reject });
    });
    this.pending.set(key, done);
    // A duplicate's derived promise reports the failure; this one must not also count as unhandled.
    done.catch(() => {});
    this.startFlush();
    return done;
  }

  /** Wait for queued appends to be committed (or fail), then close the file. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.idle;
      await this.handle.close();
    })();
    return this.closing;
  }

  /** Key and line of a record, validated so that `open` will read back the same key from the line. */
  private encode(record: T): { key: string; line: Buffer } {
    const key = computeKey(this.keyOf, record);
    if (typeof key !== "string") {
      throw new CairnError("INVALID_ARGUMENT", `Cannot append to ${this.path}: the key function ${key.problem}. Nothing was written. ${KEY_ADVICE}`, {
        file: this.path,
      }, { cause: key.cause });
    }
    let json: string | undefined;
    try {
      json = JSON.stringify(record);
    } catch (cause) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Cannot append the record with key ${JSON.stringify(key)} to ${this.path}: JSON.stringify failed (${messageOf(cause)}). ` +
          `Nothing was written. Records must be plain JSON data (no BigInt, no cycles).`,
        { file: this.path, key },
        { cause },
      );
    }
    if (json === undefined) {
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Cannot append the record with key ${JSON.stringify(key)} to ${this.path}: it has no JSON form (it is ${typeof record}). Nothing was written.`,
        { file: this.path, key },
      );
    }
    // `open` computes keys from parsed lines, so a key that changes through JSON (a Date, a Map, a
    // non-JSON field) would not be found again, and the record would be appended again after a resume.
    const reread = computeKey(this.keyOf, JSON.parse(json) as T);
    if (reread !== key) {
      const after = typeof reread === "string" ? `gives ${JSON.stringify(reread)}` : reread.problem;
      throw new CairnError(
        "INVALID_ARGUMENT",
        `Cannot append to ${this.path}: the key function gives ${JSON.stringify(key)} for the record, but on its JSON form ` +
          `(what reopening the file reads back) it ${after}. Nothing was written. ${KEY_ADVICE}`,
        { file: this.path, key },
        { cause: typeof reread === "string" ? undefined : reread.cause },
      );
    }
    // JSON.stringify escapes every control character, so the line has no raw newline but its own.
    return { key, line: Buffer.from(`${json}\n`, "utf8") };
  }

  private startFlush(): void {
    if (this.writing) return;
    this.writing = true;
    this.idle = this.flush();
  }

  /**
   * The one writer loop. Invariant: `writing` is true exactly while this loop runs, and it turns false
   * synchronously when the loop finds the queue empty, so every queued record is picked up by a loop.
   */
  private async flush(): Promise<void> {
    // Let appends issued in the same tick (a fan-out starting) join the first batch.
    await Promise.resolve();
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0);
      const bytes = batch.length === 1 ? batch[0]!.line : Buffer.concat(batch.map((q) => q.line));
      try {
        // Another writer would interleave with or overwrite this one's lines: stop rather than guess.
        const { size } = await this.handle.stat();
        if (size !== this.end) {
          throw new CairnError(
            "STORE_UNAVAILABLE",
            `Another writer changed ${this.path} while this sink was appending to it (its size is ${size} bytes, expected ${this.end}). ` +
              `A JSONL sink's file must have one writer at a time: stop the other run, then open the file again.`,
            { file: this.path },
          );
        }
        let written = 0;
        while (written < bytes.length) {
          const { bytesWritten } = await this.handle.write(bytes, written, bytes.length - written);
          written += bytesWritten;
        }
        // The commit point: until fdatasync returns, none of these records may be reported as written.
        await this.handle.datasync();
      } catch (error) {
        this.failed = { error };
        for (const q of batch) this.settle(q, () => q.reject(error));
        const later = this.failedError();
        for (const q of this.queue.splice(0)) this.settle(q, () => q.reject(later));
        break;
      }
      this.end += bytes.length;
      this.committedBatches += 1;
      for (const q of batch) {
        this.keys.add(q.key);
        this.settle(q, () => q.resolve(true));
      }
    }
    this.writing = false;
  }

  private settle(q: Queued, outcome: () => void): void {
    this.pending.delete(q.key);
    outcome();
  }

  private failedError(): CairnError {
    const cause = this.failed?.error;
    return new CairnError(
      "STORE_UNAVAILABLE",
      `An earlier write to ${this.path} failed (${messageOf(cause)}), so this sink appends nothing more: a failed write or fdatasync ` +
        `is never retried as if it had succeeded. Fix the cause (disk space, permissions), then open the file again and resume.`,
      { file: this.path },
      { cause },
    );
  }
}

/** Options of {@link JsonlSink.open}. */
export interface JsonlSinkOptions<T> {
  /**
   * The record's identity: a non-empty string, deterministic for the pipeline item that produced it
   * (e.g. the item index, or a hash of the item's input), and unchanged by a JSON round trip.
   */
  key: (record: T) => string;
}

interface Queued {
  key: string;
  line: Buffer;
  resolve: (written: boolean) => void;
  reject: (error: unknown) => void;
}

const NEWLINE = 0x0a;
const CHUNK = 1 << 20;
const KEY_ADVICE = "The key must be a non-empty string computed from fields that survive JSON (e.g. an item index or a content hash).";

/** The key, or what went wrong computing it. */
function computeKey<T>(keyOf: (record: T) => string, record: T): string | { problem: string; cause?: unknown } {
  let key: unknown;
  try {
    key = keyOf(record);
  } catch (cause) {
    return { problem: `threw (${messageOf(cause)})`, cause };
  }
  if (typeof key !== "string") return { problem: `returned ${describeValue(key)}, not a string` };
  if (key === "") return { problem: "returned an empty string" };
  return key;
}

/** Open for reading and appending, creating the file and its folders, and making a creation durable. */
async function openOrCreate(path: string): Promise<FileHandle> {
  const parent = dirname(resolve(path));
  let made: string | undefined;
  let handle: FileHandle;
  for (;;) {
    try {
      handle = await open(path, "ax+");
      break;
    } catch (error) {
      const code = (error as NodeJS.ErrnoException).code;
      if (code === "EEXIST") return open(path, "a+");
      if (code !== "ENOENT" || made !== undefined) throw error;
      made = (await mkdir(parent, { recursive: true })) ?? parent;
    }
  }
  try {
    // The new file's directory entry, and those of any folders made for it, must survive a crash, or
    // acknowledged records could vanish with them.
    const top = made === undefined ? parent : dirname(made);
    for (let dir = parent; ; dir = dirname(dir)) {
      await fsyncDir(dir);
      if (dir === top || dir === dirname(dir)) break;
    }
  } catch (error) {
    await handle.close();
    throw error;
  }
  return handle;
}


interface Scan {
  keys: Set<string>;
  /** The offset just past the last line to keep. */
  validEnd: number;
  size: number;
}

/**
 * Read the file line by line (in chunks, so its size is not bounded by memory) and collect the keys.
 * A line that is not valid JSON is a torn tail if nothing follows it, and damage otherwise; a missing
 * final newline is a torn tail; a line whose key cannot be computed is damage wherever it is.
 */
async function scanFile<T>(path: string, handle: FileHandle, keyOf: (record: T) => string): Promise<Scan> {
  const keys = new Set<string>();
  let position = 0; // file offset of the next read
  let lineStart = 0; // file offset of the first byte in `carry`
  let carry: Buffer[] = [];
  let lineNo = 0;
  let validEnd = 0;
  let unparsable: { line: number; offset: number; reason: string; cause: unknown } | undefined;

  const onLine = (bytes: Buffer, offset: number, end: number): void => {
    lineNo += 1;
    if (unparsable !== undefined) throw damaged(path, unparsable.line, unparsable.offset, unparsable.reason, unparsable.cause);
    let text = bytes.toString("utf8");
    if (lineNo === 1 && text.charCodeAt(0) === 0xfeff) text = text.slice(1);
    if (text.trim() === "") {
      validEnd = end;
      return;
    }
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (cause) {
      unparsable = { line: lineNo, offset, reason: `it is not valid JSON: ${excerpt(text)}`, cause };
      return;
    }
    const key = computeKey(keyOf, value as T);
    if (typeof key !== "string") {
      throw damaged(
        path,
        lineNo,
        offset,
        `the key function ${key.problem} on it (the file may belong to another dataset, or the key function changed)`,
        key.cause,
      );
    }
    keys.add(key);
    validEnd = end;
  };

  for (;;) {
    const chunk = Buffer.allocUnsafe(CHUNK);
    const { bytesRead } = await handle.read(chunk, 0, CHUNK, position);
    if (bytesRead === 0) break;
    position += bytesRead;
    let data = chunk.subarray(0, bytesRead);
    let nl = data.indexOf(NEWLINE);
    if (nl === -1) {
      carry.push(data);
      continue;
    }
    if (carry.length > 0) {
      const carried = carry.reduce((n, b) => n + b.length, 0);
      data = Buffer.concat([...carry, data]);
      nl += carried;
      carry = [];
    }
    let start = 0;
    while (nl !== -1) {
      onLine(data.subarray(start, nl), lineStart, lineStart + nl - start + 1);
      lineStart += nl - start + 1;
      start = nl + 1;
      nl = data.indexOf(NEWLINE, start);
    }
    if (start < data.length) carry.push(data.subarray(start));
  }
  const size = position;
  if (unparsable !== undefined) {
    // An unparsable complete line followed by the start of another is not a torn tail.
    if (carry.length > 0) throw damaged(path, unparsable.line, unparsable.offset, unparsable.reason, unparsable.cause);
    validEnd = unparsable.offset;
  }
  return { keys, validEnd, size };
}

/** Cut the torn tail, keeping its bytes beside the file; durable before it returns. */
async function cutTail(path: string, handle: FileHandle, validEnd: number, size: number): Promise<void> {
  const tail = Buffer.alloc(size - validEnd);
  await handle.read(tail, 0, tail.length, validEnd);
  const aside = await open(`${path}.cut-${validEnd}`, "w");
  try {
    await aside.write(tail);
    await aside.datasync();
  } finally {
    await aside.close();
  }
  await fsyncDir(dirname(resolve(path)));
  await handle.truncate(validEnd);
  // The cut must be durable before any append is acknowledged after it.
  await handle.datasync();
}

function damaged(path: string, line: number, offset: number, reason: string, cause?: unknown): CairnError {
  return new CairnError(
    "CHECKPOINT_CORRUPT",
    `JSONL file ${path} is damaged at line ${line} (byte ${offset}): ${reason}. Only a torn last line is repaired automatically, ` +
      `so the file was left unchanged. Fix or delete line ${line}, or move the file away to start a new one, then open it again.`,
    { file: path, line, offset },
    { cause },
  );
}

/** The start of a line, quoted, for an error message. */
function excerpt(text: string): string {
  return JSON.stringify(text.length > 80 ? `${text.slice(0, 80)}…` : text);
}

function messageOf(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}

function describeValue(value: unknown): string {
  if (value === null) return "null";
  if (typeof value === "object") return Array.isArray(value) ? "an array" : "an object";
  return `${typeof value} ${String(value)}`;
}
