"""Save the pipeline's credentials as Prefect blocks, from this process's environment.

    PREFECT_API_URL=http://localhost:4200/api python -m deployments.blocks [--dry-run]

Reads the same variables as the pipeline (:class:`speech.settings.Settings`) and saves:

* Secret ``deepgram-api-key`` from DEEPGRAM_API_KEY, ``pyannote-api-key`` from
  PYANNOTE_API_KEY, ``hf-token`` from HF_TOKEN (the table :data:`speech.settings.SECRETS`).
  Flow runs whose worker has none of these env vars read the blocks
  (:func:`flows.pipeline.with_block_secrets`).
* AwsCredentials ``whisperx-s3`` from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_DEFAULT_REGION / S3_ENDPOINT_URL (MinIO, R2, ...), and S3Bucket ``whisperx-results``
  for RESULTS_BUCKET with those credentials: set ``RESULTS_S3_BLOCK=whisperx-results`` on a
  worker and its runs write there with no AWS variables of their own. S3Bucket
  ``whisperx-task-results`` (folder ``prefect-results/`` of the same bucket) holds every worker's
  task results and cache records; the job templates name it in ``RESULTS_STORAGE_BLOCK``.

Variables that are not set are skipped (and said so); re-running overwrites. Values are
never printed. Called by infra/bootstrap.sh.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

CREDENTIALS_BLOCK = "whisperx-s3"
BUCKET_BLOCK = "whisperx-results"
TASK_RESULTS_BLOCK = "whisperx-task-results"  # what the job templates' RESULTS_STORAGE_BLOCK names
TASK_RESULTS_FOLDER = "prefect-results"


def save_blocks(dry_run: bool = False) -> list[str]:
    """Save every block whose variables are set; return one line per block (no values)."""
    from speech.redact import secret_value
    from speech.settings import SECRETS, Settings

    settings = Settings()
    report = []
    for spec in SECRETS:
        if spec.block is None:  # the S3 keys go into the AwsCredentials block below
            continue
        value = secret_value(getattr(settings, spec.setting))
        if not value:
            report.append(f"skip   Secret {spec.block!r}: {spec.env} not set")
            continue
        if not dry_run:
            from prefect.blocks.system import Secret

            Secret(value=value).save(spec.block, overwrite=True)
        report.append(f"saved  Secret {spec.block!r} from {spec.env}")

    key, secret = secret_value(settings.s3_access_key), secret_value(settings.s3_secret_key)
    if not (key and secret):
        report.append(f"skip   AwsCredentials {CREDENTIALS_BLOCK!r}: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY not set")
        return report
    endpoint = settings.s3_endpoint_url
    where = f" (endpoint {endpoint})" if endpoint else ""
    if not dry_run:
        from prefect_aws import AwsCredentials

        credentials = AwsCredentials(
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            region_name=settings.s3_region or "us-east-1",
            aws_client_parameters={"endpoint_url": endpoint} if endpoint else {},
        )
        credentials.save(CREDENTIALS_BLOCK, overwrite=True)
    report.append(f"saved  AwsCredentials {CREDENTIALS_BLOCK!r}{where}")
    if not settings.s3_bucket:
        report.append(f"skip   S3Bucket {BUCKET_BLOCK!r}: RESULTS_BUCKET not set")
        return report
    if not dry_run:
        from prefect_aws import S3Bucket

        S3Bucket(bucket_name=settings.s3_bucket, bucket_folder=settings.s3_prefix,
                 credentials=credentials).save(BUCKET_BLOCK, overwrite=True)
        S3Bucket(bucket_name=settings.s3_bucket, bucket_folder=TASK_RESULTS_FOLDER,
                 credentials=credentials).save(TASK_RESULTS_BLOCK, overwrite=True)
    report.append(f"saved  S3Bucket {BUCKET_BLOCK!r}: s3://{settings.s3_bucket}/{settings.s3_prefix} "
                  f"(use: RESULTS_S3_BLOCK={BUCKET_BLOCK})")
    report.append(f"saved  S3Bucket {TASK_RESULTS_BLOCK!r}: s3://{settings.s3_bucket}/{TASK_RESULTS_FOLDER}/ "
                  f"(task results and cache records; the job templates set RESULTS_STORAGE_BLOCK={TASK_RESULTS_BLOCK})")
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m deployments.blocks",
                                description="Save Secret / AwsCredentials / S3Bucket blocks from the environment.")
    p.add_argument("--dry-run", action="store_true", help="say what would be saved; save nothing")
    args = p.parse_args(argv)
    try:
        lines = save_blocks(args.dry_run)
    except Exception as exc:  # noqa: BLE001 - one line, no traceback, no secret values
        from speech.redact import scrub
        from speech.settings import Settings

        message = scrub(f"{type(exc).__name__}: {exc}", *Settings().secret_values())
        print(f"error: could not save blocks: {message}", file=sys.stderr)
        return 1
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
