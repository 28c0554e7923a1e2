//! How much memory the device has, where the native API says. wgpu does not report it; Vulkan does,
//! through the memory heaps and `VK_EXT_memory_budget`, reached via wgpu's `as_hal`.

use serde::Serialize;

/// Device memory as the driver reports it.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceMemory {
    /// Sum of the device-local heaps.
    pub device_local_bytes: u64,
    /// What the driver says this process may use now (VK_EXT_memory_budget), if it says.
    pub budget_bytes: Option<u64>,
    /// What the driver says is already in use by this process, if it says.
    pub usage_bytes: Option<u64>,
    pub source: &'static str,
}

/// Reads the adapter's memory heaps; `None` where the backend gives no such query.
pub fn query(adapter: &wgpu::Adapter) -> Option<DeviceMemory> {
    #[cfg(any(target_os = "linux", target_os = "windows", target_os = "android"))]
    {
        vulkan(adapter)
    }
    #[cfg(not(any(target_os = "linux", target_os = "windows", target_os = "android")))]
    {
        let _ = adapter;
        None
    }
}

#[cfg(any(target_os = "linux", target_os = "windows", target_os = "android"))]
fn vulkan(adapter: &wgpu::Adapter) -> Option<DeviceMemory> {
    use ash::vk;
    // SAFETY: the hal adapter is only borrowed for the duration of these read-only queries, and the
    // wgpu adapter outlives the guard.
    unsafe {
        let hal = adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
        let instance = hal.shared_instance().raw_instance();
        let pd = hal.raw_physical_device();
        let has_budget = instance
            .enumerate_device_extension_properties(pd)
            .map(|exts| {
                exts.iter()
                    .any(|e| e.extension_name_as_c_str() == Ok(ash::ext::memory_budget::NAME))
            })
            .unwrap_or(false);
        let mut budget = vk::PhysicalDeviceMemoryBudgetPropertiesEXT::default();
        let (props, have_budget) = if has_budget {
            let mut props2 = vk::PhysicalDeviceMemoryProperties2::default().push_next(&mut budget);
            instance.get_physical_device_memory_properties2(pd, &mut props2);
            (props2.memory_properties, true)
        } else {
            (instance.get_physical_device_memory_properties(pd), false)
        };
        let n = (props.memory_heap_count as usize).min(props.memory_heaps.len());
        let local: Vec<usize> = (0..n)
            .filter(|&i| {
                props.memory_heaps[i]
                    .flags
                    .contains(vk::MemoryHeapFlags::DEVICE_LOCAL)
            })
            .collect();
        let device_local_bytes = local.iter().map(|&i| props.memory_heaps[i].size).sum();
        let (budget_bytes, usage_bytes) = if have_budget {
            (
                Some(local.iter().map(|&i| budget.heap_budget[i]).sum()),
                Some(local.iter().map(|&i| budget.heap_usage[i]).sum()),
            )
        } else {
            (None, None)
        };
        Some(DeviceMemory {
            device_local_bytes,
            budget_bytes,
            usage_bytes,
            source: if have_budget {
                "Vulkan VK_EXT_memory_budget"
            } else {
                "Vulkan memory heaps"
            },
        })
    }
}
