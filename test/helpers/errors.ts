import { expect } from "vitest";
import { isCairnError, type CairnError, type CairnErrorCode } from "cairn";

/** The error a promise rejects with; fails the test if it resolves. */
export async function rejection(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  return expect.fail("expected a rejection");
}

/** Assert a CairnError with `code`; on mismatch the failure shows the error actually thrown. */
export function expectCode(error: unknown, code: CairnErrorCode): asserts error is CairnError {
  if (!isCairnError(error, code)) expect.fail(`expected a CairnError ${code}, got: ${error instanceof Error ? `${error.name}: ${error.message}` : String(error)}`);
}
