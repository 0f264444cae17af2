-- Each instance's latest traffic report (shardd/hotkeys.py): its top keys and its busy
-- slots as rates over the hot-key window.  Readers merge the reports younger than a few
-- report intervals; an instance that stops withdraws its row.
CREATE TABLE shardd_traffic_reports (
    instance    text PRIMARY KEY,
    reported_at timestamptz NOT NULL DEFAULT now(),
    report      jsonb NOT NULL
);
