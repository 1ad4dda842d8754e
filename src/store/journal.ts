import { crc32 } from "node:zlib";
import { CairnError } from "../errors.ts";
import { writeAll, type StoreFileHandle, type StoreFs } from "./fs.ts";
import { storageError } from "./io-errors.ts";

/**
 * One thread's append-only journal: a text file of records, one per line,
 *
 *     <crc32, 8 hex digits> <batch, 8+ hex digits> <json>\n
 *
 * where the checksum covers `<batch> <json>` and `batch` is the byte offset at which the write that
 * carried the line began (several records committed together share one write and one fdatasync).
 *
 * Atomicity: a batch is committed once fdatasync has returned. A crash before that can leave any subset
 * of the batch's bytes on disk. On reading, a line that fails its checksum (or lacks its newline) is a
 * torn tail when no later good line belongs to a later batch: those bytes were never acknowledged, and
 * everything from the bad line on is ignored and cut off by the next writer. A bad line followed by a
 * good line of a later batch is damage to committed data, reported as CHECKPOINT_CORRUPT.
 */

export interface RecordLocation {
  offset: number;
  length: number;
}

export interface ScannedRecord<T> extends RecordLocation {
  record: T;
}

const NEWLINE = 0x0a;

function checksum(body: string): string {
  return crc32(body).toString(16).padStart(8, "0");
}

/** Encode one record as a journal line of the batch that starts at byte `batch`. */
export function encodeLine(json: string, batch: number): string {
  const body = `${batch.toString(16).padStart(8, "0")} ${json}`;
  return `${checksum(body)} ${body}\n`;
}

/**
 * `encodeLine` as the bytes to write: the JSON is encoded to UTF-8 once, straight into the line, and the
 * checksum is taken over those bytes (a checksum over a string first copies it to UTF-8 again).
 */
export function encodeLineBytes(json: string, batch: number): Buffer {
  const prefix = `00000000 ${batch.toString(16).padStart(8, "0")} `;
  const size = prefix.length + Buffer.byteLength(json, "utf8") + 1;
  const line = Buffer.allocUnsafe(size);
  line.write(prefix, 0, "latin1");
  line.write(json, prefix.length, "utf8");
  line[size - 1] = NEWLINE;
  line.write(crc32(line.subarray(9, size - 1)).toString(16).padStart(8, "0"), 0, "latin1");
  return line;
}

/**
 * Decode the journal line in `bytes[start, end)` (without its newline), checking the checksum over the
 * bytes themselves; undefined if it does not match. Same result as `decodeLine` on the line's text.
 */
export function decodeLineBytes(bytes: Buffer, start: number, end: number): { batch: number; json: string } | undefined {
  if (end - start < 19 || bytes[start + 8] !== 0x20) return undefined;
  const expected = bytes.toString("latin1", start, start + 8);
  if (crc32(bytes.subarray(start + 9, end)).toString(16).padStart(8, "0") !== expected) return undefined;
  const space = bytes.indexOf(0x20, start + 9);
  if (space === -1 || space >= end || space - (start + 9) < 8) return undefined;
  return { batch: parseInt(bytes.toString("latin1", start + 9, space), 16), json: bytes.toString("utf8", space + 1, end) };
}

/** Decode one journal line (without its newline); undefined if its checksum does not match. */
export function decodeLine(line: string): { batch: number; json: string } | undefined {
  if (line.length < 19 || line[8] !== " ") return undefined;
  const body = line.slice(9);
  if (checksum(body) !== line.slice(0, 8)) return undefined;
  const space = body.indexOf(" ");
  if (space < 8) return undefined;
  return { batch: parseInt(body.slice(0, space), 16), json: body.slice(space + 1) };
}

/** A committed line that no longer reads back: its place, why, and its bytes (to tell what it held). */
export interface DamagedLine extends RecordLocation {
  why: string;
  text: string;
}

/**
 * Scan `bytes` (the journal from offset `base` on) into records. Returns the records, the offset just
 * past the last good one, whether bytes follow it that do not form good records (a torn tail, or
 * damage: the caller knows which), and the damaged lines found before later good records.
 *
 * Telling damage from a torn tail: a bad line is damage when a good line of a LATER batch follows it
 * (the writer starts a batch only after the previous one was fdatasync'ed, so the bad line had been
 * acknowledged); the good lines of the bad line's own batch are then committed too, and kept. Bad lines
 * with no later batch after them are the tail a crash tore, left out. A line whose checksum holds but
 * whose JSON does not parse was written that way, never torn: it is damage wherever it is.
 */
export function scanLines<T>(
  bytes: Buffer,
  base: number,
  /**
   * Records that end a torn tail: bad lines right before one of them are the unfinished write of a
   * writer that stopped (a lock taken over, or broken), not damage.
   */
  endsTornTail?: (record: T) => boolean,
): { records: ScannedRecord<T>[]; validEnd: number; torn: boolean; damage: DamagedLine[] } {
  const records: ScannedRecord<T>[] = [];
  const damage: DamagedLine[] = [];
  let pos = 0;
  let validEnd = base;
  // Since the first bad line not yet judged: the bad lines, and good lines of that same batch.
  let bad: DamagedLine[] = [];
  let held: ScannedRecord<T>[] = [];
  while (pos < bytes.length) {
    const nl = bytes.indexOf(NEWLINE, pos);
    if (nl === -1) break; // no newline: the end of a torn write
    const line = decodeLineBytes(bytes, pos, nl);
    const text = line === undefined ? bytes.toString("utf8", pos, nl) : "";
    const loc = { offset: base + pos, length: nl + 1 - pos };
    let record: T | undefined;
    if (line !== undefined) {
      try {
        record = JSON.parse(line.json) as T;
      } catch {
        damage.push({ ...loc, why: "its checksum matches but it is not valid JSON", text: bytes.toString("utf8", pos, nl) });
      }
    }
    if (line === undefined) {
      bad.push({ ...loc, why: "it fails its checksum", text });
    } else if (record !== undefined) {
      const scanned = { ...loc, record };
      if (bad.length > 0 && line.batch <= bad[0]!.offset) {
        held.push(scanned); // the bad line's own batch: committed only if a later batch follows
      } else {
        if (bad.length > 0) {
          if (!endsTornTail?.(record)) {
            damage.push(...bad);
            records.push(...held);
          }
          bad = [];
          held = [];
        }
        records.push(scanned);
      }
    }
    if (bad.length === 0) validEnd = base + nl + 1;
    pos = nl + 1;
  }
  damage.sort((a, b) => a.offset - b.offset);
  return { records, validEnd, torn: validEnd < base + bytes.length, damage };
}

/**
 * The writing side of a journal. Appends are queued and flushed in groups: every caller whose record is
 * in a flushed batch waits for the same single write + fdatasync (group commit), so concurrent writers
 * in this process (parallel fan-out tasks) share the cost of one durable commit.
 */
export class JournalWriter {
  private queue: { json: string; resolve: (loc: RecordLocation) => void; reject: (e: unknown) => void }[] = [];
  private flushing = false;
  private failed: unknown;
  /** Where the failure was: a write (nothing acknowledged was touched) or an fdatasync (nothing is known). */
  private failedIn?: "write" | "sync";

  private constructor(
    readonly file: string,
    private readonly handle: StoreFileHandle,
    private end: number,
    private readonly guard: () => Promise<void>,
    private readonly thread: string | undefined,
    /** This writer's generation, carried by every record it appends (see file.ts, "generations"). */
    readonly gen: number,
    private readonly superseded: (gen: number) => unknown,
  ) {}

  /**
   * Open an existing journal for appending. A torn tail beyond `validEnd` (the end of the last good
   * record the caller scanned, under the writer lock) is cut off first and that cut made durable; the cut
   * bytes are kept beside the journal as `journal.log.cut-<offset>` for inspection. `guard` runs before
   * every batch and throws if this writer may no longer write (it lost its lock).
   *
   * `cleanEnd`: where the journal's trailing clean-close record starts; the writer appends from there
   * (the record is truncated off, durably, and not kept: it holds nothing but the mark).
   *
   * Appends use O_APPEND, never a position: a writer that lost its lock while paused can only add bytes
   * after the new holder's, never overwrite them, and those bytes carry its older generation, which
   * readers ignore. After each batch the writer looks at any bytes another process appended around it;
   * a generation newer than its own among them means it lost the thread: `superseded` gives the error.
   */
  static async open(
    fs: StoreFs,
    file: string,
    validEnd: number,
    guard: () => Promise<void> = async () => {},
    thread?: string,
    cleanEnd?: number,
    gen = 0,
    superseded: (gen: number) => unknown = (g) => new Error(`superseded by generation ${g}`),
  ): Promise<JournalWriter> {
    const handle = await fs.open(file, "a+");
    let syncing = false;
    let end = validEnd;
    try {
      const { size } = await handle.stat();
      if (size > validEnd) {
        const cut = Buffer.alloc(size - validEnd);
        await handle.read(cut, 0, cut.length, validEnd);
        await fs.writeFile(`${file}.cut-${validEnd}`, cut);
        await handle.truncate(validEnd);
        syncing = true;
        await handle.datasync();
      } else if (cleanEnd !== undefined && cleanEnd < validEnd && size === validEnd) {
        await handle.truncate(cleanEnd);
        syncing = true;
        await handle.datasync();
        end = cleanEnd;
      }
    } catch (error) {
      await handle.close().catch(() => {});
      throw storageError(error, { file, thread, what: "cutting off the unfinished last write of the journal", synced: syncing });
    }
    return new JournalWriter(file, handle, end, guard, thread, gen, superseded);
  }

  get size(): number {
    return this.end;
  }

  /** Whether a write failed: this writer then refuses every further append. */
  get broken(): boolean {
    return this.failed !== undefined;
  }

  /**
   * Whether a new writer may take over after this one failed: only when a write failed (a full disk), so
   * the bytes on disk are what a fresh scan reads and a torn tail is cut. Never after a failed fdatasync,
   * nor after this process lost the thread's lock.
   */
  get reopenable(): boolean {
    return this.failed !== undefined && this.failedIn === "write" && !(this.failed instanceof CairnError);
  }

  append(json: string): Promise<RecordLocation> {
    if (this.failed !== undefined) return Promise.reject(this.failedError());
    return new Promise((resolve, reject) => {
      this.queue.push({ json: withGen(json, this.gen), resolve, reject });
      if (!this.flushing) void this.flush();
    });
  }

  private failedError(): CairnError {
    if (this.failed instanceof CairnError) return this.failed;
    const wrapped = storageError(this.failed, {
      file: this.file,
      thread: this.thread,
      what: "saving a checkpoint record",
      synced: this.failedIn === "sync",
      intact: "the checkpoint saved before it is intact (a part of this record left on disk is cut off when the thread is next written)",
    });
    if (wrapped instanceof CairnError) return wrapped;
    return new CairnError(
      "STORE_UNAVAILABLE",
      `An earlier write to ${this.file} failed (${(this.failed as Error)?.message ?? this.failed}), so this process writes no further checkpoint to it: ` +
        `a failed write or fsync is never retried as if it had succeeded. Fix the cause (disk space, permissions) and resume the thread.`,
      { file: this.file },
      { cause: this.failed },
    );
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0);
      const start = this.end;
      const buffers = batch.map((b) => encodeLineBytes(b.json, start));
      const all = buffers.length === 1 ? buffers[0]! : Buffer.concat(buffers);
      let at = start;
      let lostAfter: unknown;
      let stage: "write" | "sync" = "write";
      try {
        await this.guard();
        // No position: the file is open with O_APPEND (see `open`).
        await writeAll(this.handle, all);
        // The commit point: until fdatasync returns, none of these records may be reported as saved.
        stage = "sync";
        await this.handle.datasync();
        const { size } = await this.handle.stat();
        if (size !== start + all.length) {
          // Another process appended too: only one that lost the lock (or `cairn unlock`) can. Where did
          // this batch land, and did a newer generation take the thread before it?
          const seen = Buffer.alloc(size - start);
          await this.handle.read(seen, 0, seen.length, start);
          const i = seen.indexOf(all);
          if (i < 0 || (i > 0 && seen[i - 1] !== NEWLINE)) {
            throw new CairnError(
              "STORE_UNAVAILABLE",
              `Another process wrote to ${this.file} while this one was writing it, and this write did not land whole. A thread must have one writer at a time: stop the other run, then resume the thread.`,
              { file: this.file },
            );
          }
          const before = newestGen(seen.subarray(0, i));
          if (before > this.gen) throw this.superseded(before);
          const after = newestGen(seen.subarray(i + all.length));
          if (after > this.gen) lostAfter = this.superseded(after);
          at = start + i;
        }
        this.end = size;
      } catch (error) {
        this.failed = error;
        this.failedIn = stage;
        for (const b of batch) b.reject(this.failedError());
        for (const b of this.queue.splice(0)) b.reject(this.failedError());
        break;
      }
      let offset = at;
      for (let i = 0; i < batch.length; i += 1) {
        const length = buffers[i]!.length;
        batch[i]!.resolve({ offset, length });
        offset += length;
      }
      if (lostAfter !== undefined) {
        // This batch is recorded; nothing after it would be.
        this.failed = lostAfter;
        for (const b of this.queue.splice(0)) b.reject(this.failedError());
        break;
      }
    }
    this.flushing = false;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/** The newest generation named by a `gen` record among these journal bytes (0 if none). */
function newestGen(bytes: Buffer): number {
  let newest = 0;
  for (const text of bytes.toString("utf8").split("\n")) {
    const line = decodeLine(text);
    if (!line) continue;
    try {
      const record = JSON.parse(line.json) as { k?: unknown; g?: unknown };
      if (record.k === "gen" && typeof record.g === "number") newest = Math.max(newest, record.g);
    } catch {
      // not a record: nothing to learn from it
    }
  }
  return newest;
}

/** A record's JSON with `"g":<gen>` as its first field (replacing one it had); generation 0 is left out. */
export function withGen(json: string, gen: number): string {
  const bare = json.replace(/^\{"g":\d+,/, "{");
  if (gen === 0) return bare;
  return bare === "{}" ? `{"g":${gen}}` : `{"g":${gen},${bare.slice(1)}`;
}

/** Create a new journal holding one first record; fails with EEXIST if the file is already there. */
export async function createJournal(fs: StoreFs, file: string, json: string): Promise<void> {
  const handle = await fs.open(file, "wx");
  try {
    await writeAll(handle, Buffer.from(encodeLine(json, 0), "utf8"), 0);
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

/** Read one record back, verifying its checksum. */
export async function readRecord<T>(handle: StoreFileHandle, file: string, loc: RecordLocation): Promise<T> {
  const buf = Buffer.alloc(loc.length);
  await handle.read(buf, 0, loc.length, loc.offset);
  const line = buf[loc.length - 1] === NEWLINE ? decodeLineBytes(buf, 0, loc.length - 1) : undefined;
  if (line === undefined) {
    throw new CairnError(
      "CHECKPOINT_CORRUPT",
      `Checkpoint journal ${file} is damaged: the record at byte ${loc.offset} no longer matches its checksum. ` +
        `Nothing was loaded from it. Use an earlier checkpoint (\`cairn history\` lists them) or restore the file.`,
      { file, offset: loc.offset },
    );
  }
  try {
    return JSON.parse(line.json) as T;
  } catch (cause) {
    throw new CairnError("CHECKPOINT_CORRUPT", `Checkpoint journal ${file} is damaged: the record at byte ${loc.offset} matches its checksum but is not valid JSON. Nothing was loaded from it. Run \`cairn verify\` to see every damaged record.`, { file, offset: loc.offset }, { cause });
  }
}
