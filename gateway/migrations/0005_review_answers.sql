-- What a held answer says beside its images, returned with them once approved: JSON
-- {"fields": {"usage": ..., "output_format": ..., ...}, "revised_prompts": [string|null, ...]}
-- (the provider's documented answer fields and each image's revised prompt). NULL on rows held
-- before this migration, and when the answer had neither.
ALTER TABLE reviews ADD COLUMN answer TEXT;
