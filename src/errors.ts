/**
 * The one error family of cairn. Every error a user can act on carries a stable `code`, the value at
 * fault in `details`, and a message that says what failed and what to do next.
 */
export type CairnErrorCode =
  | "UNKNOWN_STEP"
  | "THREAD_NOT_FOUND"
  | "THREAD_EXISTS"
  | "CHECKPOINT_NOT_FOUND"
  | "CHECKPOINT_CORRUPT"
  | "INVALID_INPUT"
  | "INVALID_ARGUMENT"
  | "GRAPH_LOAD_FAILED"
  | "UNSUPPORTED_STORE"
  | "STORE_UNAVAILABLE"
  | "DISK_FULL"
  | "STORE_IO_FAILED"
  | "STEP_FAILED"
  | "HISTORY_PRUNED"
  | "THREAD_LOCKED"
  | "ARTIFACT_NOT_FOUND"
  | "FINGERPRINT_MISMATCH"
  | "STATE_SCHEMA_MISMATCH"
  | "INVALID_STATE"
  | "IMPORT_INVALID";

/** Codes whose errors are the user's input at fault: the CLI exits 2 for them, before anything is written. */
export const USAGE_ERROR_CODES: ReadonlySet<CairnErrorCode> = new Set<CairnErrorCode>([
  "UNKNOWN_STEP",
  "THREAD_NOT_FOUND",
  "THREAD_EXISTS",
  "CHECKPOINT_NOT_FOUND",
  "INVALID_INPUT",
  "INVALID_ARGUMENT",
  "GRAPH_LOAD_FAILED",
  "UNSUPPORTED_STORE",
  "HISTORY_PRUNED",
  "FINGERPRINT_MISMATCH",
  "STATE_SCHEMA_MISMATCH",
  "IMPORT_INVALID",
]);

export interface CairnErrorDetails {
  thread?: string;
  step?: string;
  file?: string;
  checkpoint?: string;
  /** The command that fixes or continues, when there is one. */
  hint?: string;
  [key: string]: unknown;
}

export class CairnError extends Error {
  readonly code: CairnErrorCode;
  readonly details: CairnErrorDetails;

  constructor(code: CairnErrorCode, message: string, details: CairnErrorDetails = {}, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "CairnError";
    this.code = code;
    this.details = details;
  }
}

/** Guard on the code rather than `instanceof`, so errors survive duplicated module copies. */
export function isCairnError(error: unknown, code?: CairnErrorCode): error is CairnError {
  if (typeof error !== "object" || error === null) return false;
  const e = error as { name?: unknown; code?: unknown };
  return e.name === "CairnError" && typeof e.code === "string" && (code === undefined || e.code === code);
}
