import { open, writeFile, type FileHandle } from "node:fs/promises";
import { crc32 } from "node:zlib";
import { CairnError } from "../errors.ts";

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

  private constructor(
    readonly file: string,
    private readonly handle: FileHandle,
    private end: number,
    private readonly guard: () => Promise<void>,
  ) {}

  /**
   * Open an existing journal for appending. A torn tail beyond `validEnd` (the end of the last good
   * record the caller scanned, under the writer lock) is cut off first and that cut made durable; the cut
   * bytes are kept beside the journal as `journal.log.cut-<offset>` for inspection. `guard` runs before
   * every batch and throws if this writer may no longer write (it lost its lock).
   */
  static async open(file: string, validEnd: number, guard: () => Promise<void> = async () => {}): Promise<JournalWriter> {
    const handle = await open(file, "r+");
    try {
      const { size } = await handle.stat();
      if (size > validEnd) {
        const cut = Buffer.alloc(size - validEnd);
        await handle.read(cut, 0, cut.length, validEnd);
        await writeFile(`${file}.cut-${validEnd}`, cut);
        await handle.truncate(validEnd);
        await handle.datasync();
      }
    } catch (error) {
      await handle.close();
      throw error;
    }
    return new JournalWriter(file, handle, validEnd, guard);
  }

  get size(): number {
    return this.end;
  }

  /** Whether a write failed: this writer then refuses every further append. */
  get broken(): boolean {
    return this.failed !== undefined;
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
        let written = 0;
        while (written < all.length) {
          const { bytesWritten } = await this.handle.write(all, written, all.length - written, start + written);
          written += bytesWritten;
        }
        // The commit point: until fdatasync returns, none of these records may be reported as saved.
        await this.handle.datasync();
      } catch (error) {
        this.failed = error;
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
export async function createJournal(file: string, json: string): Promise<void> {
  const handle = await open(file, "wx");
  try {
    await handle.write(encodeLine(json, 0));
    await handle.datasync();
  } finally {
    await handle.close();
  }
}

/** Read one record back, verifying its checksum. */
export async function readRecord<T>(handle: FileHandle, file: string, loc: RecordLocation): Promise<T> {
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
