import * as fsp from "node:fs/promises";

/**
 * The file operations the file store does, in one place. The store (saver, journal writer, artifacts)
 * does all its I/O through a `StoreFs`; the default is `node:fs/promises` itself. The seam exists so that
 * cairn's crash tests can record every write, fsync, rename and unlink the store does and stop it at any
 * one of them (test/helpers/fault-fs.ts); it is internal, not a public option.
 */
export interface StoreFs {
  /** Flags as in `fs.open`: "r", "r+", "w", "wx", and "a+" (read, and every write appends: O_APPEND). */
  open(path: string, flags: "r" | "r+" | "w" | "wx" | "a+"): Promise<StoreFileHandle>;
  readFile(path: string): Promise<Buffer>;
  /** Create or replace a file with these bytes (no fsync). */
  writeFile(path: string, data: string | Uint8Array): Promise<void>;
  readdir(path: string): Promise<string[]>;
  stat(path: string): Promise<{ size: number; mtime: Date; isFile(): boolean }>;
  /** Always recursive: creates missing parents, no error if it exists. */
  mkdir(path: string): Promise<void>;
  rename(from: string, to: string): Promise<void>;
  /** A hard link; fails with EEXIST if `to` exists. */
  link(from: string, to: string): Promise<void>;
  unlink(path: string): Promise<void>;
  /** Remove a file or folder tree; nothing if it does not exist. */
  rmTree(path: string): Promise<void>;
  utimes(path: string, atime: Date, mtime: Date): Promise<void>;
}

/** The part of `fs.promises.FileHandle` the store uses. */
export interface StoreFileHandle {
  read(buffer: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  /** At `position`, or (when it is omitted) where the previous write on this handle ended; on an "a+" handle always at the end. */
  write(buffer: Uint8Array, offset: number, length: number, position?: number): Promise<{ bytesWritten: number }>;
  stat(): Promise<{ size: number }>;
  truncate(length: number): Promise<void>;
  /** fdatasync: the file's bytes (and its size) are on disk when it returns. */
  datasync(): Promise<void>;
  /** fsync: the bytes and all metadata; on a folder, its entries. */
  sync(): Promise<void>;
  close(): Promise<void>;
}

/** The real file system. */
export const nodeFs: StoreFs = {
  open: (path, flags) => fsp.open(path, flags),
  readFile: (path) => fsp.readFile(path),
  writeFile: (path, data) => fsp.writeFile(path, data),
  readdir: (path) => fsp.readdir(path),
  stat: (path) => fsp.stat(path),
  mkdir: async (path) => {
    await fsp.mkdir(path, { recursive: true });
  },
  rename: (from, to) => fsp.rename(from, to),
  link: (from, to) => fsp.link(from, to),
  unlink: (path) => fsp.unlink(path),
  rmTree: (path) => fsp.rm(path, { recursive: true, force: true }),
  utimes: (path, atime, mtime) => fsp.utimes(path, atime, mtime),
};

/** Write all of `data` at `position` (or on from the handle's position), however many writes it takes. */
export async function writeAll(handle: StoreFileHandle, data: Uint8Array, position?: number): Promise<void> {
  let written = 0;
  while (written < data.length) {
    const at = position === undefined ? undefined : position + written;
    const { bytesWritten } = await handle.write(data, written, data.length - written, at);
    written += bytesWritten;
  }
}
