"""Custom samplers and guiders (SAMPLER / GUIDER objects for SamplerCustom and SamplerCustomAdvanced)."""
