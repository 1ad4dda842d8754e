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
export function scanLines<T>(bytes: Buffer, base: number): { records: ScannedRecord<T>[]; validEnd: number; torn: boolean; damage: DamagedLine[] } {
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
    const text = bytes.toString("utf8", pos, nl);
    const line = decodeLine(text);
    const loc = { offset: base + pos, length: nl + 1 - pos };
    let record: T | undefined;
    if (line !== undefined) {
      try {
        record = JSON.parse(line.json) as T;
      } catch {
        damage.push({ ...loc, why: "its checksum matches but it is not valid JSON", text });
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
          damage.push(...bad);
          records.push(...held);
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
  ) {}

  /**
   * Open an existing journal for appending. A torn tail beyond `validEnd` (the end of the last good
   * record the caller scanned, under the writer lock) is cut off first and that cut made durable; the cut
   * bytes are kept beside the journal as `journal.log.cut-<offset>` for inspection. `guard` runs before
   * every batch and throws if this writer may no longer write (it lost its lock).
   *
   * `cleanEnd`: where the journal's trailing clean-close record starts; the writer appends from there
   * (the record is truncated off, durably, and not kept: it holds nothing but the mark).
   */
  static async open(fs: StoreFs, file: string, validEnd: number, guard: () => Promise<void> = async () => {}, thread?: string, cleanEnd?: number): Promise<JournalWriter> {
    const handle = await fs.open(file, "r+");
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
    return new JournalWriter(file, handle, end, guard, thread);
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
      this.queue.push({ json, resolve, reject });
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
      const buffers = batch.map((b) => Buffer.from(encodeLine(b.json, start), "utf8"));
      const all = Buffer.concat(buffers);
      let stage: "write" | "sync" = "write";
      try {
        await this.guard();
        // Another process appending to this thread would make our offsets wrong: refuse rather than guess.
        const { size } = await this.handle.stat();
        if (size !== start) {
          throw new CairnError(
            "STORE_UNAVAILABLE",
            `Another process wrote to ${this.file} while this one was writing it (its size is ${size}, expected ${start}). ` +
              `A thread must have one writer at a time: stop the other run, then resume the thread.`,
            { file: this.file },
          );
        }
        await writeAll(this.handle, all, start);
        // The commit point: until fdatasync returns, none of these records may be reported as saved.
        stage = "sync";
        await this.handle.datasync();
      } catch (error) {
        this.failed = error;
        this.failedIn = stage;
        for (const b of batch) b.reject(this.failedError());
        for (const b of this.queue.splice(0)) b.reject(this.failedError());
        break;
      }
      let offset = start;
      for (let i = 0; i < batch.length; i += 1) {
        const length = buffers[i]!.length;
        batch[i]!.resolve({ offset, length });
        offset += length;
      }
      this.end = offset;
    }
    this.flushing = false;
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
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
  const line = buf[loc.length - 1] === NEWLINE ? decodeLine(buf.toString("utf8", 0, loc.length - 1)) : undefined;
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
