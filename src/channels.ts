/**
 * The names of the state channels and graph nodes cairn adds to a workflow. Shared by every layer that
 * has to recognise them (the builder writes them, the store's step files and the read model read them).
 */
export const CAIRN_PREFIX = "__cairn_";
/** The steps finished on this branch, in the order they first finished. */
export const DONE_CHANNEL = "__cairn_done";
/** What a step replaced the first time it finished (restores the state before it without history). */
export const undoChannel = (step: string) => `${CAIRN_PREFIX}undo_${step}`;
/** A fan-out's saved item results, `{ i, r }`, until its gather node folds them into the state. */
export const MAP_PREFIX = `${CAIRN_PREFIX}map_`;
export const mapChannel = (step: string) => `${MAP_PREFIX}${step}`;
/** The node that gathers a fan-out's results. */
export const gatherNode = (step: string) => `${step}__gather`;
/** What the thread has spent on model calls (`Usage`), summed over every saved task. */
export const USAGE_CHANNEL = `${CAIRN_PREFIX}usage`;
/** The hash of each step's declared fingerprint as of its latest run on this branch (`{ [step]: hash }`). */
export const FINGERPRINT_CHANNEL = `${CAIRN_PREFIX}fp`;
