import { open, type FileHandle } from "node:fs/promises";
import { crc32 } from "node:zlib";
import { CairnError } from "../errors.ts";

/**
 * One thread's append-only journal: a text file of records, one per line, each line
 * `<crc32 as 8 hex digits> <json>\n`.
 *
 * Atomicity: a record is committed once its whole line, newline included, is on disk and fdatasync has
 * returned. A crash can leave a partial last line (or a last line whose bytes were reordered by the
 * device); that torn tail fails its checksum or lacks its newline, is ignored by every reader, and is
 * cut off by the next writer before it appends. A bad line that is followed by good lines is not a torn
 * tail but damage, and is reported as CHECKPOINT_CORRUPT.
 */

export interface RecordLocation {
  offset: number;
  length: number;
}

export interface ScannedRecord<T> extends RecordLocation {
  record: T;
}

const NEWLINE = 0x0a;

/** Encode one record as a journal line. `json` must be a single-line JSON text. */
export function encodeLine(json: string): string {
  const sum = crc32(json).toString(16).padStart(8, "0");
  return `${sum} ${json}\n`;
}

/** Decode one journal line (without its newline); undefined if its checksum does not match. */
export function decodeLine(line: string): string | undefined {
  if (line.length < 10 || line[8] !== " ") return undefined;
  const json = line.slice(9);
  const sum = crc32(json).toString(16).padStart(8, "0");
  return sum === line.slice(0, 8) ? json : undefined;
}

/**
 * Scan `bytes` (the journal from `base` on) into records. Returns the records and the offset just past the
 * last good one. Throws CHECKPOINT_CORRUPT for a bad line that has good lines after it.
 */
export function scanLines<T>(
  file: string,
  bytes: Buffer,
  base: number,
): { records: ScannedRecord<T>[]; validEnd: number } {
  const records: ScannedRecord<T>[] = [];
  let pos = 0;
  let validEnd = base;
  let badAt: number | undefined;
  while (pos < bytes.length) {
    const nl = bytes.indexOf(NEWLINE, pos);
    if (nl === -1) break; // no newline: a torn last write
    const json = decodeLine(bytes.toString("utf8", pos, nl));
    if (json === undefined) {
      badAt ??= base + pos;
    } else {
      if (badAt !== undefined) {
        throw new CairnError(
          "CHECKPOINT_CORRUPT",
          `Checkpoint journal ${file} is damaged at byte ${badAt}: a record fails its checksum but later records are intact. ` +
            `Nothing was loaded from it. Run \`cairn history\` on an intact copy, or move the file aside to start the thread again.`,
          { file, offset: badAt },
        );
      }
      records.push({ offset: base + pos, length: nl + 1 - pos, record: JSON.parse(json) as T });
      validEnd = base + nl + 1;
    }
    pos = nl + 1;
  }
  return { records, validEnd };
}

/**
 * The writing side of a journal. Appends are queued and flushed in groups: every caller whose record is
 * in a flushed batch waits for the same single write + fdatasync (group commit), so concurrent writers
 * (parallel fan-out tasks) share the cost of one durable commit.
 */
export class JournalWriter {
  private queue: { line: string; resolve: (loc: RecordLocation) => void; reject: (e: unknown) => void }[] = [];
  private flushing = false;
  private failed: unknown;

  private constructor(
    readonly file: string,
    private readonly handle: FileHandle,
    private end: number,
  ) {}

  /** Open for appending; a torn tail beyond `validEnd` is cut off first (and that cut made durable). */
  static async open(file: string, validEnd: number): Promise<JournalWriter> {
    const handle = await open(file, "a+");
    const { size } = await handle.stat();
    if (size > validEnd) {
      await handle.truncate(validEnd);
      await handle.datasync();
    }
    return new JournalWriter(file, handle, validEnd);
  }

  get size(): number {
    return this.end;
  }

  append(json: string): Promise<RecordLocation> {
    if (this.failed !== undefined) return Promise.reject(this.failedError());
    return new Promise((resolve, reject) => {
      this.queue.push({ line: encodeLine(json), resolve, reject });
      if (!this.flushing) void this.flush();
    });
  }

  private failedError(): CairnError {
    return new CairnError(
      "STORE_UNAVAILABLE",
      `An earlier write to ${this.file} failed, so no further checkpoint is written by this process (a failed fsync is never retried as if it had succeeded). ` +
        `Fix the cause (disk space, permissions) and resume the thread.`,
      { file: this.file },
      { cause: this.failed },
    );
  }

  private async flush(): Promise<void> {
    this.flushing = true;
    while (this.queue.length > 0) {
      const batch = this.queue.splice(0);
      const buffers = batch.map((b) => Buffer.from(b.line, "utf8"));
      const all = Buffer.concat(buffers);
      try {
        let written = 0;
        while (written < all.length) {
          const { bytesWritten } = await this.handle.write(all, written, all.length - written);
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
      let offset = this.end;
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

/** Read one record back, verifying its checksum. */
export async function readRecord<T>(handle: FileHandle, file: string, loc: RecordLocation): Promise<T> {
  const buf = Buffer.alloc(loc.length);
  await handle.read(buf, 0, loc.length, loc.offset);
  const json = decodeLine(buf.toString("utf8", 0, Math.max(0, loc.length - 1)));
  if (json === undefined || buf[loc.length - 1] !== NEWLINE) {
    throw new CairnError(
      "CHECKPOINT_CORRUPT",
      `Checkpoint journal ${file} is damaged: the record at byte ${loc.offset} no longer matches its checksum. ` +
        `Nothing was loaded from it. Use an earlier checkpoint (\`cairn history\` lists them) or restore the file.`,
      { file, offset: loc.offset },
    );
  }
  return JSON.parse(json) as T;
}
