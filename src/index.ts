export { FileCheckpointSaver, FILE_STORE_FORMAT_VERSION, type FileCheckpointSaverOptions } from "./store/file.ts";
export { CairnError, isCairnError, type CairnErrorCode, type CairnErrorDetails } from "./errors.ts";
