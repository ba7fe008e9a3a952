-- Seed rows for the content table. Idempotent (ON CONFLICT DO NOTHING).
-- Deliberate edge cases: content_id 4 has NULL length, content_id 5 has length 0.
-- content_id 21+ do not exist, so events for them exercise the "unknown content" path.
INSERT INTO content (content_id, content_type, length_seconds) VALUES
  (1,  'video',      300),
  (2,  'podcast',    1800),
  (3,  'newsletter', 120),
  (4,  'video',      NULL),
  (5,  'video',      0),
  (6,  'podcast',    2400),
  (7,  'video',      95),
  (8,  'newsletter', 60),
  (9,  'video',      600),
  (10, 'podcast',    3600),
  (11, 'video',      45),
  (12, 'newsletter', 240),
  (13, 'video',      1200),
  (14, 'podcast',    900),
  (15, 'video',      8),
  (16, 'newsletter', 30),
  (17, 'video',      3),
  (18, 'podcast',    1500),
  (19, 'video',      700),
  (20, 'newsletter', 180)
ON CONFLICT (content_id) DO NOTHING;
