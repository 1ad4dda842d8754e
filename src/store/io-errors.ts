import { CairnError } from "../errors.ts";

/** errno codes that mean the disk (or the user's quota) has no room left. */
const FULL = new Set(["ENOSPC", "EDQUOT"]);
/** errno codes of a file system that failed to do what was asked (the device, not cairn's input). */
const FAILED = new Set(["EIO", "EROFS", "EFBIG", "ENXIO"]);

function errno(error: unknown): string | undefined {
  const code = (error as NodeJS.ErrnoException | undefined)?.code;
  return typeof code === "string" ? code : undefined;
}

/** Whether a file operation failed because the disk is full, or the device failed (not a missing file or a permission). */
export function isStorageFailure(error: unknown): boolean {
  const code = errno(error);
  return code !== undefined && (FULL.has(code) || FAILED.has(code));
}

/**
 * The error a run stops with when the store's disk is full or failed while saving: `DISK_FULL` (ENOSPC,
 * EDQUOT) or `STORE_IO_FAILED` (EIO and the like, and every failed fsync). It names the file, says what
 * is intact and what to do. Errors that are not a full or failing disk come back as they are.
 *
 * `synced`: the failure was an fsync/fdatasync. After it nothing can be known about what reached the
 * disk (Linux may drop the unwritten pages and report the next fsync clean), so the writer never writes
 * again in this process and the message says so whatever the errno was.
 */
export function storageError(error: unknown, where: { file: string; thread?: string; what: string; synced?: boolean; intact?: string }): unknown {
  if (error instanceof CairnError) return error;
  const code = errno(error);
  if (!where.synced && (code === undefined || !(FULL.has(code) || FAILED.has(code)))) return error;
  const thread = where.thread;
  const resume = thread !== undefined ? `cairn resume <graph.ts> --thread ${thread}` : "cairn resume <graph.ts> --thread <thread>";
  const intact = where.intact ?? "the checkpoints saved before it are intact";
  const details = { file: where.file, ...(thread !== undefined ? { thread } : {}), errno: code, hint: resume };
  if (code !== undefined && FULL.has(code)) {
    return new CairnError(
      "DISK_FULL",
      `The disk holding ${where.file} is full (${code}${code === "EDQUOT" ? ": disk quota exceeded" : ""}) while ${where.what}: it was not saved, and ${intact}. ` +
        `Free space on that disk, then continue with \`${resume}\`.`,
      details,
      { cause: error },
    );
  }
  const how = where.synced ? `the fsync of ${where.file} failed` : `writing ${where.file} failed`;
  return new CairnError(
    "STORE_IO_FAILED",
    `${how.charAt(0).toUpperCase()}${how.slice(1)} (${code ?? (error as Error)?.message ?? String(error)}) while ${where.what}: it was not saved, and ${intact}. ` +
      (where.synced
        ? `After a failed fsync nothing tells which bytes reached the disk, so this process writes nothing more to the file (it never retries an fsync as if it had worked). `
        : "") +
      `Check the disk (dmesg, free space, a read-only remount), then continue with \`${resume}\` in a new process.`,
    details,
    { cause: error },
  );
}
